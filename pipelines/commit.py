"""Resume and commit: what is already done, and the merge that makes metadata exactly-once.

Ray may run a batch twice (restarted actors recompute in-flight blocks), so staging can hold two rows for
one sample. `commit` reads the committed metadata plus every staging part, keeps one row per
(model, id, sample), writes the result under a fresh generation name, then deletes what it replaced.
A crash at any point leaves a state the next commit merges correctly, since reading is a union.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipelines.storage import join, parquet_bytes, put_atomic
from pipelines.write import METADATA_SCHEMA, STAGING

log = logging.getLogger(__name__)
ROWS_PER_FILE = 100_000
SUCCESS, SUMMARY, SPEC = "_SUCCESS", "summary.json", "_spec.json"


def _parquet_files(fs: AbstractFileSystem, path: str) -> list[str]:
    if not fs.exists(path):
        return []
    return sorted(f for f in fs.find(path) if f.endswith(".parquet"))


def metadata_files(fs: AbstractFileSystem, root: str) -> tuple[list[str], list[str]]:
    """(committed files, staging parts)."""
    return _parquet_files(fs, join(root, "metadata")), _parquet_files(fs, join(root, STAGING, "metadata"))


def _read(fs: AbstractFileSystem, files: list[str], columns: list[str] | None = None) -> pa.Table:
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh, columns=columns))
    schema = METADATA_SCHEMA if columns is None else pa.schema([METADATA_SCHEMA.field(c) for c in columns])
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def done_keys(fs: AbstractFileSystem, root: str) -> frozenset[str]:
    committed, staged = metadata_files(fs, root)
    t = _read(fs, committed + staged, ["model", "id", "sample"])
    return frozenset(f"{m}/{i}/{s}" for m, i, s in zip(*(t.column(c).to_pylist() for c in ("model", "id", "sample"))))


def commit(fs: AbstractFileSystem, root: str) -> pa.Table:
    """Merge staging into metadata/ with one row per sample; returns the committed table."""
    committed, staged = metadata_files(fs, root)
    table = _read(fs, committed + staged)
    if not staged and committed:
        return table
    keys = pc.binary_join_element_wise(table["model"], table["id"], pc.cast(table["sample"], pa.string()), "/")
    first = pa.table({"k": keys, "i": pa.array(range(len(keys)), pa.int64())}).group_by("k").aggregate([("i", "min")])
    table = table.take(first["i_min"]).sort_by([("model", "ascending"), ("id", "ascending"), ("sample", "ascending")])
    gen = uuid.uuid4().hex[:8]
    for n, start in enumerate(range(0, max(len(table), 1), ROWS_PER_FILE)):
        put_atomic(fs, join(root, "metadata", f"part-{gen}-{n:05d}.parquet"),
                   parquet_bytes(table.slice(start, ROWS_PER_FILE)))
    for f in committed + staged:  # only now: every row above is safely in the new generation
        fs.rm(f)
    if len(table) != len(committed) and staged:
        log.info("committed %d metadata rows (%d staging parts merged)", len(table), len(staged))
    return table


def write_json(fs: AbstractFileSystem, path: str, obj: Any) -> None:
    fs.pipe(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(fs: AbstractFileSystem, path: str) -> Any:
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None
