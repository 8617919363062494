"""Read: find the input Parquet files, check them in the driver before any work, then read with Ray Data.

The driver opens every footer (corrupt or unreadable files, missing columns and wrong types fail the job
before anything is written) and reads the id column once to find duplicate ids, which need a global view
that per-batch validation cannot have.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
import ray.data
from fsspec import AbstractFileSystem

from pipelines.batch.validate import InvalidUTF8, column_values
from pipelines.spec import InputSpec
from pipelines.storage import full_url
from pipelines.tables import InputError, list_files, ray_read_parquet

PROMPT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                pa.types.is_large_binary, pa.types.is_null)
ID_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer)


@dataclass
class InputPlan:
    fs: AbstractFileSystem
    files: list[str]  # every input file, in order
    rows: int  # after `limit`
    columns: list[str]
    duplicate_ids: set[str] = field(default_factory=set)
    whole: list[str] | None = None  # the files read in full (None: all of them)
    head: tuple[str, int] | None = None  # `limit` ends inside this file: its first n rows


def _limit(files: list[str], counts: list[int], limit: int | None) -> tuple[list[str], tuple[str, int] | None]:
    """`limit` as the first rows in file order: files read whole, then the head of the one it ends in. (Ray
    Data's `limit` over several files keeps whichever rows arrive first: a rerun or resume chose other prompts.)"""
    if limit is None:
        return files, None
    whole, left = [], limit
    for f, n in zip(files, counts):
        if left <= 0:
            break
        if n > left:
            return whole, (f, left)
        whole.append(f)
        left -= n
    return whole, None


def _check_type(fs: AbstractFileSystem, f: str, schema: pa.Schema, col: str, what: str, ok: tuple) -> None:
    if col not in schema.names:
        raise InputError(f"{full_url(fs, f)}: missing {what} column {col!r} (columns: {schema.names})")
    t = schema.field(col).type
    if not any(check(t) for check in ok):
        raise InputError(f"{full_url(fs, f)}: {what} column {col!r} has type {t}, expected a string column")


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def plan_input(spec: InputSpec) -> InputPlan:
    fs, files = list_files(spec.path, spec.storage_options)
    rows, first, counts = 0, None, []
    ids: Counter[str] = Counter()
    for f in files:
        try:
            with fs.open(f, "rb") as fh:
                pf = pq.ParquetFile(fh)
                schema, n = pf.schema_arrow, pf.metadata.num_rows
                counts.append(n)
                _check_type(fs, f, schema, spec.prompt_column, "prompt", PROMPT_TYPES)
                missing = [c for c in spec.keep_columns if c not in schema.names]
                if missing:
                    raise InputError(f"{full_url(fs, f)}: missing input.keep_columns {missing} "
                                     f"(columns: {schema.names})")
                if spec.id_column is not None:
                    _check_type(fs, f, schema, spec.id_column, "id", ID_TYPES)
                    take = _rows_read(rows, n, spec.limit)  # only rows the run reads (`limit`) can collide
                    col = pf.read(columns=[spec.id_column]).column(0)[:take] if take else pa.chunked_array([], pa.null())
                    ids.update(str(v) for v in column_values(col) if v is not None and not isinstance(v, InvalidUTF8))
        except InputError:
            raise
        except Exception as e:  # pyarrow raises ArrowInvalid / OSError for corrupt files
            raise InputError(f"{full_url(fs, f)}: not a readable Parquet file ({e})") from e
        if first is None:
            first = (f, schema)
        elif not schema.equals(first[1]):
            raise InputError(f"input files disagree on their columns: {full_url(fs, first[0])} has "
                             f"{_describe(first[1])}, {full_url(fs, f)} has {_describe(schema)}")
        rows += n
    if spec.limit is not None:
        rows = min(rows, spec.limit)
    whole, head = _limit(files, counts, spec.limit)
    return InputPlan(fs, files, rows, first[1].names if first else [], {i for i, c in ids.items() if c > 1},
                     whole, head)


def _rows_read(before: int, n: int, limit: int | None) -> int:
    """Of a file of n rows after `before` rows of earlier files, how many the run reads."""
    return n if limit is None else max(0, min(n, limit - before))


def read_prompts(plan: InputPlan, spec: InputSpec) -> ray.data.Dataset:
    """All original columns; `row_hash` (file path + row position) when ids are derived. A file is one read task
    whose blocks come in row order, so the head's `limit` keeps its first rows."""
    def read(files: list[str]) -> ray.data.Dataset:
        return ray_read_parquet(files, plan.fs, include_row_hash=spec.id_column is None)

    whole = plan.files if plan.whole is None else plan.whole
    parts = ([read(whole)] if whole else []) + ([read([plan.head[0]]).limit(plan.head[1])] if plan.head else [])
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
