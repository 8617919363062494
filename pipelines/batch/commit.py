"""Resume and commit: what is already done, and the merge that makes metadata exactly-once.

Ray may run a batch twice (restarted actors recompute in-flight blocks), so staging can hold two rows for
one sample. `commit` reads the committed metadata plus every staging part, keeps one row per
(model, id, sample), writes the result under a fresh generation name, then deletes what it replaced.
A crash at any point leaves a state the next commit merges correctly, since reading is a union.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem

from pipelines.batch.diversity import annotate
from pipelines.layout import (
    METADATA,
    METADATA_SCHEMA,
    SHARDS,
    STAGING,
    member_key,
    sample_keys,
    shard_relpath,
    tar_bytes,
    tar_members,
)
from pipelines.storage import full_url, join, parquet_bytes, put_atomic

log = logging.getLogger(__name__)
ROWS_PER_FILE = 100_000
SHARD_MANIFEST = "shards-manifest"


def _parquet_files(fs: AbstractFileSystem, path: str) -> list[str]:
    if not fs.exists(path):
        return []
    return sorted(f for f in fs.find(path) if f.endswith(".parquet"))


def metadata_files(fs: AbstractFileSystem, root: str) -> tuple[list[str], list[str]]:
    """(committed files, staging parts), listed afresh: workers wrote parts since this process last listed, and
    s3fs answers info() from its listing cache (a part missing there is FileNotFoundError, not a read)."""
    fs.invalidate_cache()  # all of it: s3fs drops only the path and its parents, not the folders below
    return _parquet_files(fs, join(root, METADATA)), _parquet_files(fs, join(root, STAGING, METADATA))


def _read(fs: AbstractFileSystem, files: list[str], columns: list[str] | None = None) -> pa.Table:
    tables = []
    for f in files:  # whole objects (one GET each, retried as one), not streams cut mid-read by an outage
        tables.append(pq.read_table(pa.BufferReader(fs.cat_file(f)), columns=columns))
    schema = (pa.schema(list(METADATA_SCHEMA) + _extra_fields(tables)) if columns is None
              else pa.schema([METADATA_SCHEMA.field(c) for c in columns]))
    return pa.concat_tables([_conform(t, schema) for t in tables]) if tables else schema.empty_table()


def _extra_fields(tables: list[pa.Table]) -> list[pa.Field]:
    """Columns beyond ours (input.keep_columns), in order of first appearance, each with its first non-null type."""
    found: dict[str, pa.DataType] = {}
    for t in tables:
        for f in t.schema:
            if f.name not in METADATA_SCHEMA.names and (f.name not in found or pa.types.is_null(found[f.name])):
                found[f.name] = f.type
    return [pa.field(k, v) for k, v in found.items()]


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """`t` in `schema`'s columns and types; a column added to the layout later is null in older parts."""
    cols = [t[f.name] if f.name in t.column_names else pa.nulls(len(t), f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=pa.schema([f.with_type(c.type) for f, c in zip(schema, cols)])).cast(schema)


def read_metadata(fs: AbstractFileSystem, root: str) -> pa.Table:
    """The committed metadata of a run (what a user reads)."""
    return _read(fs, metadata_files(fs, root)[0])


def done_keys(fs: AbstractFileSystem, root: str) -> frozenset[str]:
    committed, staged = metadata_files(fs, root)
    return frozenset(sample_keys(_read(fs, committed + staged, ["model", "id", "sample"])))


def commit(fs: AbstractFileSystem, root: str, near_duplicate_distance: float | None = None) -> pa.Table:
    """Merge staging into metadata/ with one row per sample, each prompt's diversity and near-duplicates set over
    all its samples (`pipelines.batch.diversity`); returns the committed table."""
    committed, staged = metadata_files(fs, root)
    table = _read(fs, committed + staged)
    keys = pa.array(sample_keys(table), pa.string())
    first = pa.table({"k": keys, "i": pa.array(range(len(keys)), pa.int64())}).group_by("k").aggregate([("i", "min")])
    if not staged and committed and len(first) == len(table):
        return table  # nothing staged and already one row per sample (always checked: a second writer's leftovers)
    table = table.take(first["i_min"]).sort_by([("model", "ascending"), ("id", "ascending"), ("sample", "ascending")])
    table = annotate(table, near_duplicate_distance)
    table = _finalize_shards(fs, root, table)
    gen = uuid.uuid4().hex[:8]
    for n, start in enumerate(range(0, max(len(table), 1), ROWS_PER_FILE)):
        put_atomic(fs, join(root, METADATA, f"part-{gen}-{n:05d}.parquet"),
                   parquet_bytes(table.slice(start, ROWS_PER_FILE)))
    for f in committed + staged:  # only now: every row above is safely in the new generation
        fs.rm(f)
    _sweep_shards(fs, root, table)
    if len(table) != len(committed) and staged:
        log.info("committed %d metadata rows (%d staging parts merged)", len(table), len(staged))
    return table


SHARD_NAME = re.compile(r"/(\d{5,})\.tar$")


def _finalize_shards(fs: AbstractFileSystem, root: str, table: pa.Table) -> pa.Table:
    """Staged WebDataset tars -> `shards/<model>/{n:05d}.tar`, numbered after the committed ones.

    Copied, not moved: until the new metadata generation is written, the old one still points at the
    staged tars. A tar none of whose rows survived deduplication (a batch Ray ran twice) is not copied;
    one that kept only some rows is rewritten without the others, so no sample is in two shards.
    """
    if "image_path" not in table.column_names or not len(table):
        return table
    staged_root = full_url(fs, join(root, STAGING, SHARDS))
    paths = table.column("image_path").to_pylist()
    keys, models = table.column("image_key").to_pylist(), table.column("model").to_pylist()
    staged: dict[str, set[str]] = {}
    last: dict[str, int] = {}
    for p, k, m in zip(paths, keys, models):
        if p is None:
            continue
        if p.startswith(staged_root + "/"):
            staged.setdefault(p, set()).add(k)
        elif (hit := SHARD_NAME.search(p)) is not None:
            last[m] = max(last.get(m, -1), int(hit.group(1)))
    if not staged:
        return table
    final: dict[str, str] = {}
    plan, numbers = [], dict(last)
    referenced = {fs._strip_protocol(p) for p in paths if p}
    for p in sorted(staged):
        model = models[paths.index(p)]
        while True:  # never overwrite a shard the metadata does not reference: it may not be ours
            numbers[model] = numbers.get(model, -1) + 1
            dest = join(root, shard_relpath(model, numbers[model]))
            if dest in referenced or not fs.exists(dest):
                break
        plan.append((p, dest))
    # on record before the first copy: a commit that dies half-way leaves shards that only this manifest
    # proves are ours (the sweep deletes nothing else)
    write_json(fs, join(root, STAGING, f"{SHARD_MANIFEST}-{uuid.uuid4().hex[:8]}.json"), [d for _, d in plan])
    for p, dest in plan:
        data = fs.cat_file(fs._strip_protocol(p))
        members = tar_members(data)
        kept = [(name, b) for name, b in members if member_key(name) in staged[p]]
        if len(kept) != len(members):
            data = tar_bytes(kept)
        put_atomic(fs, dest, data)
        final[p] = full_url(fs, dest)
    return table.set_column(table.schema.get_field_index("image_path"), "image_path",
                            pa.array([final.get(p, p) for p in paths], pa.string()))


def _sweep_shards(fs: AbstractFileSystem, root: str, table: pa.Table) -> None:
    """Delete staged tars, and shards a commit copied (listed in its manifest) that the committed metadata does
    not reference (left by a commit that died between copying shards and writing metadata): a reader globbing
    shards/ sees each sample once. A shard no manifest lists is not ours to delete, whatever its name."""
    if fs.exists(join(root, STAGING, SHARDS)):
        fs.rm(join(root, STAGING, SHARDS), recursive=True)
    manifests = fs.glob(join(root, STAGING, f"{SHARD_MANIFEST}-*.json")) if fs.exists(join(root, STAGING)) else []
    used = {fs._strip_protocol(p) for p in table.column("image_path").to_pylist() if p}
    for m in manifests:
        for f in read_json(fs, m) or []:
            if fs._strip_protocol(f) not in used and fs.exists(f):
                log.warning("removing unreferenced shard %s (copied by a commit that did not finish)", f)
                fs.rm(f)
        fs.rm(m)


def write_json(fs: AbstractFileSystem, path: str, obj: Any) -> None:
    fs.pipe(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(fs: AbstractFileSystem, path: str) -> Any:
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None

