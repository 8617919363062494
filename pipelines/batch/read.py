"""Read: find the input files (Parquet, CSV, TSV or JSON Lines), check them in the driver before any work, then
read with Ray Data.

The driver opens every Parquet footer, or streams every text file once (corrupt or unreadable files, a malformed
line, missing columns and wrong types fail the job before anything is written); it holds one footer or parse block
at a time, never the rows. Duplicate ids need a global view that per-batch validation cannot have: they are found
on Ray Data (`pipelines.batch.duplicates`) over the id column alone. Parquet reads ask for the columns the run uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from fsspec import AbstractFileSystem
from promptmill.pipelines.batch.duplicates import duplicated
from promptmill.pipelines.batch.validate import ID, InvalidUTF8, id_texts
from promptmill.pipelines.spec import InputSpec
from promptmill.pipelines.storage import full_url
from promptmill.pipelines.tables import InputError, list_files, ray_read_parquet
from promptmill.pipelines.text_tables import input_format, ray_read_text, scan, suffixes

PROMPT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                pa.types.is_large_binary, pa.types.is_null)
TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_null)  # per-row controls: text, not bytes
ID_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer)


@dataclass(frozen=True)
class InputFile:
    """One input file as the run found it: what the output's input manifest records (`pipelines.batch.inputs`)."""
    url: str
    size: int | None
    rows: int | None  # None: a text file not read past `input.limit`
    fingerprint: str  # what the filesystem says changes with the bytes: an etag, else a modification time


@dataclass
class InputPlan:
    fs: AbstractFileSystem
    files: list[str]  # every input file, in order
    format: str  # of every file: parquet, csv, tsv or jsonl (`pipelines.text_tables`)
    rows: int  # after `limit`
    columns: list[str]  # every input column
    # `limit` as the first rows in file order: the files read in full, then the head of the one it ends in (its
    # first n rows). Ray Data's `limit` over several files kept whichever rows arrived first: a rerun or resume
    # chose other prompts.
    whole: list[str] = field(default_factory=list)
    head: tuple[str, int] | None = None
    id_column: str | None = None
    found: list[InputFile] = field(default_factory=list)  # the manifest: each file's size, rows and fingerprint

    @property
    def duplicate_ids(self) -> set[str]:
        """Ids that occur more than once among the rows the run reads, collected from Ray Data: for tests and
        diagnostics only (the job marks them on Ray Data and never holds them in the driver)."""
        import ray

        if self.id_column is None:
            return set()
        if not ray.is_initialized():  # never a cluster some `ray start` left recorded on this machine
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        return {r[ID] for r in duplicated(read_ids(self)).take_all()}


def _check_type(fs: AbstractFileSystem, f: str, schema: pa.Schema, col: str, what: str, ok: tuple) -> None:
    if col not in schema.names:
        raise InputError(f"{full_url(fs, f)}: missing {what} column {col!r} (columns: {schema.names})")
    t = schema.field(col).type
    if not any(check(t) for check in ok):
        raise InputError(f"{full_url(fs, f)}: {what} column {col!r} has type {t}, expected a string column")


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def _check_columns(fs: AbstractFileSystem, f: str, schema: pa.Schema, spec: InputSpec) -> None:
    _check_type(fs, f, schema, spec.prompt_column, "prompt", PROMPT_TYPES)
    missing = [c for c in spec.keep_columns if c not in schema.names]
    if missing:
        raise InputError(f"{full_url(fs, f)}: missing input.keep_columns {missing} (columns: {schema.names})")
    for col, what in ((spec.negative_prompt_column, "negative prompt"), (spec.size_column, "size")):
        if col is not None:
            _check_type(fs, f, schema, col, what, TEXT_TYPES)
    if spec.id_column is not None:
        _check_type(fs, f, schema, spec.id_column, "id", ID_TYPES)


def _parquet_file(fs: AbstractFileSystem, f: str, spec: InputSpec) -> tuple[pa.Schema, int]:
    """(schema, rows) from the footer alone."""
    try:
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            schema, n = pf.schema_arrow, pf.metadata.num_rows
            _check_columns(fs, f, schema, spec)
            return schema, n
    except InputError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for corrupt files
        raise InputError(f"{full_url(fs, f)}: not a readable Parquet file ({e})") from e


def _text_file(fs: AbstractFileSystem, f: str, fmt: str, spec: InputSpec, remaining: int | None
               ) -> tuple[pa.Schema, int]:
    """(schema, rows) of a CSV / TSV / JSON Lines file, streamed once: a malformed line fails here, naming the file
    and line. Past `remaining` + 1 rows it is not read further."""
    schema, n = scan(fs, f, fmt, remaining)
    _check_columns(fs, f, schema, spec)
    return schema, n


FINGERPRINT_KEYS = ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated", "created")


def _found(fs: AbstractFileSystem, f: str, rows: int | None) -> InputFile:
    """The file's size and fingerprint as the filesystem reports them (S3: ETag; GCS: etag; local: mtime)."""
    info = fs.info(f)
    mark = next((str(info[k]) for k in FINGERPRINT_KEYS if info.get(k) is not None), "")
    return InputFile(full_url(fs, f), info.get("size"), rows, mark)


def plan_input(spec: InputSpec) -> InputPlan:
    fs, files = list_files(spec.path, spec.storage_options, suffixes=suffixes(spec.format))
    fmt = input_format(fs, files, spec.format)
    rows, first, whole, head, found = 0, None, [], None, []
    for f in files:
        remaining = None if spec.limit is None else max(0, spec.limit - rows)
        schema, n = (_parquet_file(fs, f, spec) if fmt == "parquet" else _text_file(fs, f, fmt, spec, remaining))
        take = n if remaining is None else min(n, remaining)  # rows of it the run reads
        found.append(_found(fs, f, n if fmt == "parquet" or remaining is None or n <= remaining else None))
        if first is None:
            first = (f, schema)
        elif not schema.equals(first[1]):
            raise InputError(f"input files disagree on their columns: {full_url(fs, first[0])} has "
                             f"{_describe(first[1])}, {full_url(fs, f)} has {_describe(schema)}")
        if take == n:
            whole.append(f)
        elif take:
            head = (f, take)
        rows += n
    if spec.limit is not None:
        rows = min(rows, spec.limit)
    return InputPlan(fs, files, fmt, rows, first[1].names if first else [], whole=whole, head=head,
                     id_column=spec.id_column, found=found)


def used_columns(spec: InputSpec) -> list[str]:
    """The input columns a drawn sample needs: id, prompt, input.keep_columns and the per-row controls."""
    named = [spec.id_column, spec.prompt_column, *spec.keep_columns, spec.negative_prompt_column, spec.size_column]
    return list(dict.fromkeys(c for c in named if c is not None))


def read_prompts(plan: InputPlan, spec: InputSpec, columns: list[str] | None = None) -> ray.data.Dataset:
    """The rows the run reads, with `columns` (None: every original column; Parquet reads no others); `row_hash`
    (file path + row position) when ids are derived (`spec.id_column` unset)."""
    return _read(plan, columns, derived=spec.id_column is None)


def _read(plan: InputPlan, columns: list[str] | None, derived: bool) -> ray.data.Dataset:
    """A file is one read task whose blocks come in row order; the head (the file `limit` ends in) is read up to
    the row group or text batch holding its last row, no further."""
    def read(files: list[str], head: int | None = None) -> ray.data.Dataset:
        if plan.format == "parquet":
            return ray_read_parquet(files, plan.fs, include_row_hash=derived, columns=columns, head=head)
        ds = ray_read_text(files, plan.fs, plan.format, include_row_hash=derived, head=head)
        return ds if columns is None else ds.select_columns(columns + (["row_hash"] if derived else []))

    parts = ([read(plan.whole)] if plan.whole else []) + ([read([plan.head[0]], plan.head[1])] if plan.head else [])
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def read_ids(plan: InputPlan) -> ray.data.Dataset:
    """One row (column ID, the id as text) per row the run reads whose id is set and valid UTF-8: what duplicate
    detection counts. Parquet reads the id column alone."""
    column = plan.id_column
    assert column is not None, "derived ids (row_hash) are unique by construction"

    def ids(t: pa.Table) -> pa.Table:
        values = [v for v in id_texts(t.column(column)) if v is not None and not isinstance(v, InvalidUTF8)]
        return pa.table({ID: pa.array(values, pa.string())})

    return _read(plan, [column], derived=False).map_batches(ids, batch_format="pyarrow")
