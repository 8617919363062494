"""Read: find the input files (Parquet, CSV, TSV or JSON Lines), check them in the driver before any work, then
read with Ray Data.

The driver opens every Parquet footer, or streams every text file once (corrupt or unreadable files, a malformed
line, missing columns and wrong types fail the job before anything is written), and reads the id column once to
find duplicate ids, which need a global view that per-batch validation cannot have.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from fsspec import AbstractFileSystem
from promptmill.pipelines.batch.validate import InvalidUTF8, column_values
from promptmill.pipelines.spec import InputSpec
from promptmill.pipelines.storage import full_url
from promptmill.pipelines.tables import InputError, list_files, ray_read_parquet
from promptmill.pipelines.text_tables import input_format, ray_read_text, scan, suffixes

PROMPT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                pa.types.is_large_binary, pa.types.is_null)
TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_null)  # per-row controls: text, not bytes
ID_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer)


@dataclass
class InputPlan:
    fs: AbstractFileSystem
    files: list[str]  # every input file, in order
    format: str  # of every file: parquet, csv, tsv or jsonl (`pipelines.text_tables`)
    rows: int  # after `limit`
    columns: list[str]
    duplicate_ids: set[str] = field(default_factory=set)
    # `limit` as the first rows in file order: the files read in full, then the head of the one it ends in (its
    # first n rows). Ray Data's `limit` over several files kept whichever rows arrived first: a rerun or resume
    # chose other prompts.
    whole: list[str] = field(default_factory=list)
    head: tuple[str, int] | None = None


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


def _parquet_file(fs: AbstractFileSystem, f: str, spec: InputSpec, remaining: int | None
                  ) -> tuple[pa.Schema, int, pa.ChunkedArray | None]:
    """(schema, rows, ids of the rows the run reads) from a footer and the id column."""
    try:
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            schema, n = pf.schema_arrow, pf.metadata.num_rows
            take = n if remaining is None else max(0, min(n, remaining))
            _check_columns(fs, f, schema, spec)
            ids = pf.read(columns=[spec.id_column]).column(0)[:take] if spec.id_column is not None and take else None
            return schema, n, ids
    except InputError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for corrupt files
        raise InputError(f"{full_url(fs, f)}: not a readable Parquet file ({e})") from e


def _text_file(fs: AbstractFileSystem, f: str, fmt: str, spec: InputSpec, remaining: int | None
               ) -> tuple[pa.Schema, int, pa.ChunkedArray | None]:
    """(schema, rows, ids of the rows the run reads) of a CSV / TSV / JSON Lines file, streamed once: a
    malformed line fails here, naming the file and line. Past `remaining` + 1 rows it is not read further."""
    schema, n, ids = scan(fs, f, fmt, spec.id_column, remaining)
    _check_columns(fs, f, schema, spec)
    return schema, n, None if spec.id_column is None else pa.chunked_array([ids], schema.field(spec.id_column).type)


def plan_input(spec: InputSpec) -> InputPlan:
    fs, files = list_files(spec.path, spec.storage_options, suffixes=suffixes(spec.format))
    fmt = input_format(fs, files, spec.format)
    rows, first, whole, head = 0, None, [], None
    ids: Counter[str] = Counter()
    for f in files:
        remaining = None if spec.limit is None else max(0, spec.limit - rows)
        schema, n, col = (_parquet_file(fs, f, spec, remaining) if fmt == "parquet"
                          else _text_file(fs, f, fmt, spec, remaining))
        take = n if remaining is None else min(n, remaining)  # rows of it the run reads
        if col is not None:  # only rows the run reads can collide
            ids.update(str(v) for v in column_values(col) if v is not None and not isinstance(v, InvalidUTF8))
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
    return InputPlan(fs, files, fmt, rows, first[1].names if first else [], {i for i, c in ids.items() if c > 1},
                     whole=whole, head=head)


def read_prompts(plan: InputPlan, spec: InputSpec) -> ray.data.Dataset:
    """All original columns; `row_hash` (file path + row position) when ids are derived. A file is one read task
    whose blocks come in row order, so the head's `limit` keeps its first rows."""
    def read(files: list[str]) -> ray.data.Dataset:
        if plan.format == "parquet":
            return ray_read_parquet(files, plan.fs, include_row_hash=spec.id_column is None)
        return ray_read_text(files, plan.fs, plan.format, include_row_hash=spec.id_column is None)

    parts = ([read(plan.whole)] if plan.whole else []) + ([read([plan.head[0]]).limit(plan.head[1])] if plan.head else [])
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
