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

import logging
import math
import re
import tempfile
import uuid
import zlib
from collections.abc import Callable
from pathlib import Path

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
    dataset_schema,
    member_key,
    own_shard,
    run_path,
    sample_keys,
    shard_relpath,
    tar_bytes,
    tar_members,
)
from promptmill.pipelines.metadata import (
    KEYS,
    SUMMARY_COLUMNS,
    conform,
    extra_fields,
    metadata_files,
    read_part,
    read_parts,
    sized_metadata_files,
    sorted_by_key,
    union,
)
from promptmill.pipelines.storage import join, parquet_bytes, put_atomic, read_json, write_json

log = logging.getLogger(__name__)
BUCKET_BYTES = 8 << 20  # Parquet bytes merged in memory at once (~10k scored rows): the commit's memory bound
SPILL_ROWS = 8_192  # rows read before they are split into the buckets' spill files (~16 MB)
MAX_BUCKETS = 4_096
SHARD_MANIFEST = "shards-manifest"


def done_keys(fs: AbstractFileSystem, root: str, files: list[str] | None = None) -> frozenset[str]:
    """Sample keys in the committed metadata and the staged parts (`files`: those, already listed)."""
    if files is None:
        committed, staged = metadata_files(fs, root)
        files = committed + staged
    return frozenset(sample_keys(read_parts(fs, files, KEYS)))


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
    committed_sizes, staged_sizes = sized_metadata_files(fs, root)
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
            return read_parts(fs, committed, SUMMARY_COLUMNS)
        guard = fence.guard if fence is not None else (lambda: None)
        shards = _finalize_shards(fs, root, members, guard)
        gen, summaries = uuid.uuid4().hex[:8], []
        for b, bucket in enumerate(parts):
            if not bucket:
                continue
            table = union([pq.read_table(p) for p in bucket])
            table = annotate(sorted_by_key(table.take(_first_rows(table))), near_duplicates[1], near_duplicates[0])
            if shards:
                paths = table.column("image_path").to_pylist()
                table = table.set_column(table.schema.get_field_index("image_path"), "image_path",
                                         pa.array([shards.get(p, p) for p in paths], pa.string()))
            guard()
            put_atomic(fs, join(root, METADATA, f"part-{gen}-{b:05d}.parquet"), parquet_bytes(_described(table)))
            summaries.append(table.select(SUMMARY_COLUMNS))
            del table
            pa.default_memory_pool().release_unused()  # else the pool keeps every bucket's peak (module doc)
    if not summaries:  # an empty run still commits one (empty) file: a reader finds its schema
        put_atomic(fs, join(root, METADATA, f"part-{gen}-00000.parquet"), 
                   parquet_bytes(_described(METADATA_SCHEMA.empty_table())))
    if fence is not None:
        fence.check()  # still ours before the old parts go: a successor may be reading them
    for f in files:  # only now: every row above is safely in the new generation
        fs.rm(f)
    _sweep_shards(fs, root, members, shards)
    if staged:
        log.info("committed %d metadata rows (%d staging parts merged)", count, len(staged))
    return union(summaries, SUMMARY_COLUMNS)


def _described(table: pa.Table) -> pa.Table:
    """A committed part says where its paths point and carries `datasets`' features (`layout.dataset_schema`)."""
    return table.replace_schema_metadata(dataset_schema(table.schema).metadata)


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
        t = read_part(fs, f)
        pending.append(conform(t, pa.schema(list(METADATA_SCHEMA) + extra_fields([t]))))
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
            t = union([pq.read_table(p, columns=INDEX) for p in bucket], INDEX)
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
    staged_root = join(root, STAGING, SHARDS)  # rows name tars relative to root (older runs: absolute URLs)
    paths = kept.column("image_path").to_pylist()
    keys, models = kept.column("image_key").to_pylist(), kept.column("model").to_pylist()
    staged: dict[str, tuple[str, set[str]]] = {}
    last: dict[str, int] = {}
    for p, k, m in zip(paths, keys, models):
        if run_path(root, p).startswith(staged_root + "/"):
            staged.setdefault(p, (m, set()))[1].add(k)
        elif (hit := SHARD_NAME.search(p)) is not None:
            last[m] = max(last.get(m, -1), int(hit.group(1)))
    if not staged:
        return {}
    final: dict[str, str] = {}
    plan, numbers = [], dict(last)
    referenced = {run_path(root, p) for p in paths if p}
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
        data = fs.cat_file(run_path(root, p))
        members = tar_members(data)
        keep = [(name, b) for name, b in members if member_key(name) in staged[p][1]]
        if len(keep) != len(members):
            data = tar_bytes(keep)
        guard()  # the lease still ours before each shard: numbers are picked by exists-then-write
        put_atomic(fs, dest, data)
        final[p] = dest[len(root.rstrip("/")) + 1:]
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
    used = {run_path(root, moved.get(p, p)) for p in _shard_rows(kept).column("image_path").to_pylist()}
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
