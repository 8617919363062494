"""Resume and commit: what is already done, and the merge that makes metadata exactly-once.

Ray may run a batch twice (restarted actors recompute in-flight blocks), so staging can hold two rows for
one sample. `commit` reads the committed metadata plus every staging part, keeps one row per
(model, id, sample), writes the result under a fresh generation name, then deletes what it replaced.
A crash at any point leaves a state the next commit merges correctly, since reading is a union.

The merge holds one bucket in memory at a time, not the run: rows are split by a hash of (model, id) into
buckets of about `BUCKET_BYTES` of Parquet, spilled to a local temporary folder, then each bucket is
deduplicated, sorted, annotated (a prompt's samples all land in one bucket) and written as one file. Nothing
of every row is held at once but the few columns the job's summary needs (SUMMARY_COLUMNS); WebDataset rows
also keep their tar paths, which the shards' commit needs before the first bucket is written. Arrow's memory
pool keeps what it freed unless told, so each bucket's peak stayed for good: +79 MB over 15 buckets at 100k
rows (`benchmarks/commit_memory.py`); it is released after each.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from promptmill.pipelines.batch.diversity import annotate
from promptmill.pipelines.batch.lease import Fence
from promptmill.pipelines.layout import (
    METADATA,
    METADATA_SCHEMA,
    SHARDS,
    STAGING,
    member_key,
    own_shard,
    sample_keys,
    shard_relpath,
    tar_bytes,
    tar_members,
)
from promptmill.pipelines.storage import full_url, join, parquet_bytes, put_atomic

log = logging.getLogger(__name__)
BUCKET_BYTES = 8 << 20  # Parquet bytes merged in memory at once (~10k scored rows): the commit's memory bound
SPILL_ROWS = 8_192  # rows read before they are split into the buckets' spill files (~16 MB)
MAX_BUCKETS = 4_096
KEYS = ["model", "id", "sample"]
# what the job's summary needs of the committed rows (`pipelines.runs.results.score_summary`), returned by commit
SUMMARY_COLUMNS = ["model", "id", "sample", "clip_score", "prompt_match", "candidates", "diversity", "near_duplicate",
                   "nsfw", "prompt_truncated", "aesthetic_score"]
SHARD_MANIFEST = "shards-manifest"


def _listing(fs: AbstractFileSystem, path: str) -> dict[str, int]:
    """Parquet files under `path` (sorted) with their sizes, from one listing."""
    if not fs.exists(path):
        return {}
    found = fs.find(path, detail=True)
    return {f: int(found[f].get("size") or 0) for f in sorted(found) if f.endswith(".parquet")}


def _metadata_listing(fs: AbstractFileSystem, root: str) -> tuple[dict[str, int], dict[str, int]]:
    """(committed files, staging parts) with their sizes, listed afresh: workers wrote parts since this process
    last listed, and s3fs answers info() from its listing cache (a part missing there is FileNotFoundError)."""
    fs.invalidate_cache()  # all of it: s3fs drops only the path and its parents, not the folders below
    return _listing(fs, join(root, METADATA)), _listing(fs, join(root, STAGING, METADATA))


def metadata_files(fs: AbstractFileSystem, root: str) -> tuple[list[str], list[str]]:
    """(committed files, staging parts), listed afresh (`_metadata_listing`)."""
    committed, staged = _metadata_listing(fs, root)
    return list(committed), list(staged)


def _read_one(fs: AbstractFileSystem, f: str, columns: list[str] | None = None) -> pa.Table:
    """A whole object (one GET, retried as one), not a stream cut mid-read by an outage; only `columns` (those
    the file has) are decoded."""
    buf = pa.BufferReader(fs.cat_file(f))
    if columns is not None:
        have = pq.read_schema(buf).names
        columns = [c for c in columns if c in have]
        buf.seek(0)
    return pq.read_table(buf, columns=columns)


def _read(fs: AbstractFileSystem, files: list[str], columns: list[str] | None = None) -> pa.Table:
    return _union([_read_one(fs, f, columns) for f in files], columns)


def _union(tables: list[pa.Table], columns: list[str] | None = None) -> pa.Table:
    """Tables written at different times as one: our columns in layout order, then the extra ones (`columns`: those
    asked for, kept input columns included)."""
    schema = (pa.schema(list(METADATA_SCHEMA) + _extra_fields(tables)) if columns is None
              else pa.schema([METADATA_SCHEMA.field(c) for c in columns if c in METADATA_SCHEMA.names]
                             + [f for f in _extra_fields(tables) if f.name in columns]))
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


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("model", "ascending"), ("id", "ascending"), ("sample", "ascending")])


def read_metadata(fs: AbstractFileSystem, root: str, columns: list[str] | None = None) -> pa.Table:
    """The committed metadata of a run (what a user reads), sorted by model, id, sample; `columns` (with those
    three) or all."""
    return _sorted(_read(fs, metadata_files(fs, root)[0], columns))


def done_keys(fs: AbstractFileSystem, root: str, files: list[str] | None = None) -> frozenset[str]:
    """Sample keys in the committed metadata and the staged parts (`files`: those, already listed)."""
    if files is None:
        committed, staged = metadata_files(fs, root)
        files = committed + staged
    return frozenset(sample_keys(_read(fs, files, KEYS)))


def _first_rows(table: pa.Table) -> pa.Array:
    """Index of the first row of each sample key, ascending (committed files are read first, so they win)."""
    keys = pc.binary_join_element_wise(table["model"], table["id"], pc.cast(table["sample"], pa.string()), "\x1f")
    first = pa.table({"k": keys, "i": pa.array(range(len(table)), pa.int64())}).group_by("k").aggregate([("i", "min")])
    rows = first["i_min"].combine_chunks() if len(first) else pa.array([], pa.int64())
    return rows.take(pc.array_sort_indices(rows))


def commit(fs: AbstractFileSystem, root: str, near_duplicates: tuple[str, float | None] = ("judge_features", None),
           fence: Fence | None = None) -> pa.Table:
    """Merge staging into metadata/ with one row per sample, each prompt's diversity and near-duplicates set over
    all its samples (`pipelines.batch.diversity`); returns the committed rows' SUMMARY_COLUMNS. `fence`: the
    run's lease; only the staged parts it accepts are merged, and it is checked before anything is replaced."""
    committed_sizes, staged_sizes = _metadata_listing(fs, root)
    if fence is not None:
        for p in [p for p in staged_sizes if not fence.accepts(p)]:
            log.warning("not committing %s: written by another holder of the lease (a stale writer) after this "
                        "run took it", p)
            del staged_sizes[p]
        fence.check()
    committed, staged = list(committed_sizes), list(staged_sizes)
    files = committed + staged
    size = sum(committed_sizes.values()) + sum(staged_sizes.values())
    buckets = min(MAX_BUCKETS, max(1, math.ceil(size / BUCKET_BYTES)))
    with tempfile.TemporaryDirectory(prefix="promptmill-commit-") as spill:
        rows = _split(fs, files, buckets, Path(spill))
        parts = _bucket_parts(Path(spill), buckets)
        count, members = _kept(parts)
        if not staged and committed and count == rows:
            # nothing staged and already one row per sample (always checked: a second writer's leftovers)
            return _read(fs, committed, SUMMARY_COLUMNS)
        guard = fence.guard if fence is not None else (lambda: None)
        shards = _finalize_shards(fs, root, members, guard)
        gen, summaries = uuid.uuid4().hex[:8], []
        for b, bucket in enumerate(parts):
            if not bucket:
                continue
            table = _union([pq.read_table(p) for p in bucket])
            table = annotate(_sorted(table.take(_first_rows(table))), near_duplicates[1], near_duplicates[0])
            if shards:
                paths = table.column("image_path").to_pylist()
                table = table.set_column(table.schema.get_field_index("image_path"), "image_path",
                                         pa.array([shards.get(p, p) for p in paths], pa.string()))
            guard()
            put_atomic(fs, join(root, METADATA, f"part-{gen}-{b:05d}.parquet"), parquet_bytes(table))
            summaries.append(table.select(SUMMARY_COLUMNS))
            del table
            pa.default_memory_pool().release_unused()  # else the pool keeps every bucket's peak (module doc)
    if not summaries:  # an empty run still commits one (empty) file: a reader finds its schema
        put_atomic(fs, join(root, METADATA, f"part-{gen}-00000.parquet"), parquet_bytes(METADATA_SCHEMA.empty_table()))
    if fence is not None:
        fence.check()  # still ours before the old parts go: a successor may be reading them
    for f in files:  # only now: every row above is safely in the new generation
        fs.rm(f)
    _sweep_shards(fs, root, members, shards)
    if staged:
        log.info("committed %d metadata rows (%d staging parts merged)", count, len(staged))
    return _union(summaries, SUMMARY_COLUMNS)


INDEX = ["model", "id", "sample", "image_path", "image_key"]  # what deduplication and the shards' commit read


def _split(fs: AbstractFileSystem, files: list[str], buckets: int, spill: Path) -> int:
    """Every file's rows, in file order, appended to the spill files of their bucket (hash of model and id);
    returns the number of rows.

    Files are gathered to SPILL_ROWS before they are split: thousands of 64-row parts cut into buckets would
    be tens of thousands of tiny tables, whose overhead outweighed the rows."""
    pending: list[pa.Table] = []
    writers: dict[int, pq.ParquetWriter] = {}
    opened, rows = [0], [0]

    def flush() -> None:
        t = pa.concat_tables(pending, promote_options="permissive")
        pending.clear()
        rows[0] += len(t)
        ids, models = t.column("id").to_pylist(), t.column("model").to_pylist()
        which = pa.array([zlib.crc32(f"{m}\x1f{i}".encode()) % buckets for m, i in zip(models, ids)], pa.int32())
        for b in pc.unique(which).to_pylist():
            part, w = t.filter(pc.equal(which, b)), writers.get(b)
            if w is None or w.schema != part.schema:  # a part with another keep_columns type: a new file for it
                if w is not None:
                    w.close()
                w = writers[b] = pq.ParquetWriter(spill / f"b{b:05d}-{opened[0]:06d}.parquet", part.schema)
                opened[0] += 1
            w.write_table(part)

    for f in files:
        t = _read_one(fs, f)
        pending.append(_conform(t, pa.schema(list(METADATA_SCHEMA) + _extra_fields([t]))))
        if sum(len(p) for p in pending) >= SPILL_ROWS:
            flush()
    if pending:
        flush()
    for w in writers.values():
        w.close()
    pa.default_memory_pool().release_unused()
    return rows[0]


def _bucket_parts(spill: Path, buckets: int) -> list[list[Path]]:
    """Each bucket's spill files in the order they were opened, so their rows are in file order (one listing)."""
    parts: list[list[Path]] = [[] for _ in range(buckets)]
    for p in sorted(spill.glob("b*-*.parquet")):
        parts[int(p.name[1:6])].append(p)
    return parts


def _kept(parts: list[list[Path]]) -> tuple[int, pa.Table]:
    """(rows the commit keeps, INDEX columns of those whose image is a tar member), one bucket at a time: all
    of a sample's rows lie in its bucket, in file order, so its first row there is its first in the run. Only
    the tar members are held for the whole run (none in a files or Parquet output)."""
    count, members = 0, []
    for bucket in parts:
        if bucket:
            t = _union([pq.read_table(p, columns=INDEX) for p in bucket], INDEX)
            t = t.take(_first_rows(t))
            count += len(t)
            members.append(_shard_rows(t))
    return count, pa.concat_tables(members) if members else METADATA_SCHEMA.empty_table().select(INDEX)


SHARD_NAME = re.compile(r"/(\d{5,})\.tar$")


def _shard_rows(kept: pa.Table) -> pa.Table:
    """The rows whose image is a tar member (WebDataset); none in other formats, and no Python object per row."""
    path = kept["image_path"]
    return kept.filter(pc.fill_null(pc.ends_with(path, ".tar"), False)) if len(kept) else kept


def _finalize_shards(fs: AbstractFileSystem, root: str, kept: pa.Table,
                     guard: Callable[[], None] = lambda: None) -> dict[str, str]:
    """Staged WebDataset tars -> `shards/<model>/{n:05d}.tar`, numbered after the committed ones; returns each
    staged tar's final URL. `kept`: INDEX columns of the rows the commit keeps (only tar members are read).

    Copied, not moved: until the new metadata generation is written, the old one still points at the
    staged tars. A tar none of whose rows survived deduplication (a batch Ray ran twice) is not copied;
    one that kept only some rows is rewritten without the others, so no sample is in two shards.
    """
    kept = _shard_rows(kept)
    if not len(kept):
        return {}
    staged_root = full_url(fs, join(root, STAGING, SHARDS))
    paths = kept.column("image_path").to_pylist()
    keys, models = kept.column("image_key").to_pylist(), kept.column("model").to_pylist()
    staged: dict[str, tuple[str, set[str]]] = {}
    last: dict[str, int] = {}
    for p, k, m in zip(paths, keys, models):
        if p.startswith(staged_root + "/"):
            staged.setdefault(p, (m, set()))[1].add(k)
        elif (hit := SHARD_NAME.search(p)) is not None:
            last[m] = max(last.get(m, -1), int(hit.group(1)))
    if not staged:
        return {}
    final: dict[str, str] = {}
    plan, numbers = [], dict(last)
    referenced = {fs._strip_protocol(p) for p in paths if p}
    for p in sorted(staged):
        model = staged[p][0]
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
        keep = [(name, b) for name, b in members if member_key(name) in staged[p][1]]
        if len(keep) != len(members):
            data = tar_bytes(keep)
        guard()  # the lease still ours before each shard: numbers are picked by exists-then-write
        put_atomic(fs, dest, data)
        final[p] = full_url(fs, dest)
    return final


def _sweep_shards(fs: AbstractFileSystem, root: str, kept: pa.Table, moved: dict[str, str]) -> None:
    """Delete staged tars, and shards a commit copied (listed in its manifest) that the committed metadata does
    not reference (left by a commit that died between copying shards and writing metadata): a reader globbing
    shards/ sees each sample once. A shard no manifest lists is not ours to delete, whatever its name.
    `kept` / `moved`: the committed rows' image paths before the commit moved their staged tars, and the moves."""
    if fs.exists(join(root, STAGING, SHARDS)):
        fs.rm(join(root, STAGING, SHARDS), recursive=True)
    manifests = fs.glob(join(root, STAGING, f"{SHARD_MANIFEST}-*.json")) if fs.exists(join(root, STAGING)) else []
    if not manifests:
        return
    used = {fs._strip_protocol(moved.get(p, p)) for p in _shard_rows(kept).column("image_path").to_pylist()}
    for m in manifests:
        listed = read_json(fs, m)
        for f in listed if isinstance(listed, list) else []:
            path = fs._strip_protocol(f) if isinstance(f, str) else None
            if path is None or not own_shard(root, path):  # a shared output's manifest may name anything
                log.warning("%s lists %r, which is not one of this output's shards: left alone", m, f)
            elif path not in used and fs.exists(path):
                log.warning("removing unreferenced shard %s (copied by a commit that did not finish)", f)
                fs.rm(path)
        fs.rm(m)


def write_json(fs: AbstractFileSystem, path: str, obj: Any) -> None:
    fs.pipe(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(fs: AbstractFileSystem, path: str) -> Any:
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None

