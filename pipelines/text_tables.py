"""CSV, TSV and JSON Lines tables (plain or gzip / bz2 / zstd / xz, any fsspec URL): the format from the file name,
record batches streamed by pyarrow, and a bad line named by file and line number. The input reader plans with
`scan` in the driver and reads with `ray_read_text` in Ray Data, through the same `batches`."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
from fsspec import AbstractFileSystem
from promptmill.pipelines.storage import full_url
from promptmill.pipelines.tables import InputError, first_rows, ray_read_files

if TYPE_CHECKING:
    import ray.data

SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": "xz"}  # fsspec's names
INPUT_SUFFIXES = tuple(s + c for s in SUFFIXES for c in ("", *COMPRESSIONS) if not (s == ".parquet" and c))
BLOCK_BYTES = 1 << 20  # pyarrow's parse block: a batch of a few thousand prompts, the driver's memory per file


def suffixes(declared: str = "auto") -> tuple[str, ...]:
    """The names a folder's input files may have: every format's, or the declared format's only."""
    return tuple(s for s in INPUT_SUFFIXES if declared == "auto" or _split(s)[0] == declared)


def _split(path: str) -> tuple[str | None, str | None]:
    """(format, compression) from a file name: `prompts.csv.gz` -> ("csv", "gzip"); an unknown suffix -> None."""
    name = path.rsplit("/", 1)[-1].lower()
    compression = next((c for s, c in COMPRESSIONS.items() if name.endswith(s)), None)
    if compression:
        name = name.rsplit(".", 1)[0]
    return next((f for s, f in SUFFIXES.items() if name.endswith(s)), None), compression


def file_format(path: str, declared: str = "auto") -> str:
    """A file's table format: `input.format` when declared, else its suffix; no known suffix reads as Parquet."""
    return declared if declared != "auto" else (_split(path)[0] or "parquet")


def compression(path: str) -> str | None:
    return _split(path)[1]


def input_format(fs: AbstractFileSystem, files: list[str], declared: str = "auto") -> str:
    """The one format of an input's files; a folder or glob mixing formats is refused, naming two of them."""
    found: dict[str, str] = {}
    for f in files:
        found.setdefault(file_format(f, declared), f)
    if len(found) > 1:
        shown = ", ".join(f"{full_url(fs, f)} ({fmt})" for fmt, f in found.items())
        raise InputError(f"input.path mixes table formats: {shown}; use one format per input (or set input.format)")
    return next(iter(found), declared if declared != "auto" else "parquet")


@contextmanager
def _open(fs: AbstractFileSystem, path: str) -> Iterator:
    """The file's bytes, decompressed: fsspec's codecs, and pyarrow's zstd (fsspec's needs the zstandard package)."""
    codec = compression(path)
    with fs.open(path, "rb", compression=None if codec == "zstd" else codec) as fh:
        yield pa.CompressedInputStream(pa.PythonFile(fh, mode="r"), "zstd") if codec == "zstd" else fh


def _reader(fs: AbstractFileSystem, path: str, fh, fmt: str):
    """pyarrow's streaming reader over `fh`; every CSV / TSV column is text (ids like 007 stay as written), their
    names from the header, read first from a second opening (a compressed stream cannot seek back)."""
    opts = {"read_options": (pjson if fmt == "jsonl" else pcsv).ReadOptions(use_threads=False, block_size=BLOCK_BYTES)}
    if fmt == "jsonl":
        return pjson.open_json(fh, **opts)
    opts["parse_options"] = pcsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True)
    with _open(fs, path) as first:
        header = pcsv.open_csv(first, **opts).schema.names
    return pcsv.open_csv(fh, **opts, convert_options=pcsv.ConvertOptions(
        column_types={c: pa.string() for c in header}, strings_can_be_null=False))


def batches(fs: AbstractFileSystem, path: str, fmt: str, row_hash: bool = False) -> Iterator[pa.RecordBatch]:
    """The file's rows in order; `row_hash` (file + row position) for derived ids. A file pyarrow cannot parse
    is an InputError naming the file and, where a line is at fault, its number (`_bad_line`)."""
    start = 0
    try:
        with _open(fs, path) as fh:
            reader = _reader(fs, path, fh, fmt)
            for batch in reader:
                if fmt == "jsonl":
                    batch.validate(full=True)  # pyarrow's JSON parser lets invalid UTF-8 into strings; CSV's checks
                if row_hash:
                    batch = batch.append_column("row_hash", pa.array(
                        [_hash(path, start + i) for i in range(batch.num_rows)], pa.uint64()))
                start += batch.num_rows
                yield batch
            if not start:  # a header and no rows: its columns still count
                yield pa.RecordBatch.from_pylist([], schema=reader.schema if not row_hash
                                                 else reader.schema.append(pa.field("row_hash", pa.uint64())))
    except InputError:
        raise
    except (pa.ArrowInvalid, UnicodeDecodeError, EOFError, OSError, ValueError) as e:
        raise InputError(_describe(fs, path, fmt, e)) from e


def _hash(path: str, row: int) -> int:
    return int.from_bytes(hashlib.blake2b(f"{path}\x1f{row}".encode(), digest_size=8).digest(), "little")


def _describe(fs: AbstractFileSystem, path: str, fmt: str, error: Exception) -> str:
    where = full_url(fs, path)
    try:
        bad = _bad_line(fs, path, fmt)
    except _Located as e:
        bad = e.line, e.what
    except Exception as e:  # noqa: BLE001 - the file cannot even be read line by line: say that
        return f"{where}: not a readable {fmt} file ({e})"
    if bad is None:
        return f"{where}: not a readable {fmt} file ({error})"
    return f"{where}: line {bad[0]}: {bad[1]}"


def _bad_line(fs: AbstractFileSystem, path: str, fmt: str) -> tuple[int, str] | None:
    """(line number, what is wrong) of the first malformed line, read again in Python only once pyarrow failed
    (its errors count rows within a parse block, not lines of the file)."""
    with _open(fs, path) as fh:
        lines = _utf8_lines(fh)
        if fmt == "jsonl":
            for n, line in lines:
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as e:
                    return n, f"not valid JSON ({e.msg}, column {e.colno})"
                if not isinstance(value, dict):
                    return n, (f"a JSON Lines row must be an object, got {type(value).__name__} (.json inputs are "
                               "read as JSON Lines: one object a line)")
            return None
        numbered = _NumberedLines(lines)
        rows = csv.reader(numbered, delimiter="\t" if fmt == "tsv" else ",")
        header = next(rows, None)
        for row in rows:
            if header is not None and len(row) != len(header):
                return numbered.number, f"expected {len(header)} fields (the header's), found {len(row)}"
    return None


def _raw_lines(fh) -> Iterator[bytes]:
    """Lines of any readable (pyarrow's zstd stream has no readline), each with its newline."""
    rest = b""
    while chunk := fh.read(BLOCK_BYTES):
        *lines, rest = (rest + chunk).split(b"\n")
        yield from (line + b"\n" for line in lines)
    if rest:
        yield rest


def _utf8_lines(fh) -> Iterator[tuple[int, str]]:
    for n, raw in enumerate(_raw_lines(fh), 1):
        try:
            yield n, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _Located(n, f"not valid UTF-8 (byte {e.start + 1})") from e


class _Located(Exception):
    """A line found bad while lines are read (invalid UTF-8)."""

    def __init__(self, line: int, what: str) -> None:
        super().__init__(what)
        self.line, self.what = line, what


class _NumberedLines:
    """csv.reader's line iterator, remembering the number of the last line it gave (a row may span lines)."""

    def __init__(self, lines: Iterator[tuple[int, str]]) -> None:
        self.lines, self.number = lines, 0

    def __iter__(self) -> _NumberedLines:
        return self

    def __next__(self) -> str:
        self.number, line = next(self.lines)
        return line


def scan(fs: AbstractFileSystem, path: str, fmt: str, want: int | None) -> tuple[pa.Schema, int]:
    """(schema, rows) of one file, streamed: the driver holds one parse block at a time. Stops once more than `want`
    rows are seen (those past the run's `input.limit` are never read by the job either)."""
    schema, rows = None, 0
    for batch in batches(fs, path, fmt):
        schema = schema or batch.schema
        rows += batch.num_rows
        if want is not None and rows > want:
            break
    return schema, rows


def ray_read_text(files: list[str], fs: AbstractFileSystem, fmt: str, include_row_hash: bool = False,
                  head: int | None = None) -> ray.data.Dataset:
    """One Ray Data read task per file, its blocks in row order; `head`: each file's first rows only (not read
    further)."""
    def read(f: str) -> Iterator[pa.Table]:
        return first_rows((pa.Table.from_batches([b]) for b in batches(fs, f, fmt, include_row_hash)), head)

    return ray_read_files(files, read)
