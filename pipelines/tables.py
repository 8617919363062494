"""Parquet tables on any fsspec URL: find the files under a path, read columns. Shared by the job's reader,
training, evaluation and schedules (never imports the job or training code)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from promptmill.pipelines.storage import filesystem

if TYPE_CHECKING:
    import ray.data


class InputError(ValueError):
    """Input that cannot be read at all; the message names the file and column."""


def parquet_row_hashes(path: str, start: int, n: int) -> np.ndarray:
    """Derived ids of Parquet rows: the uint64 that Ray Data 2.60's `include_row_hash` gives (MD5 of the path seeds
    the splitmix64 finalizer over row positions). Ours, so an id never moves with the Ray release: outputs written
    under 2.60 resume with the same ids on any Ray in the supported range."""
    seed = np.uint64(int.from_bytes(hashlib.md5(path.encode("utf-8")).digest()[:8], "little"))
    with np.errstate(over="ignore"):
        keys = seed + np.arange(start, start + n, dtype=np.uint64)
        keys ^= keys >> np.uint64(30)
        keys *= np.uint64(0xBF58476D1CE4E5B9)
        keys ^= keys >> np.uint64(27)
        keys *= np.uint64(0x94D049BB133111EB)
        keys ^= keys >> np.uint64(31)
    return keys


def ray_read_files(files: list[str], read: Callable[[str], Iterator[pa.Table]]) -> ray.data.Dataset:
    """One Ray Data read task per file, its blocks in row order (a head's `limit` keeps its first rows); public
    Datasource API only."""
    import ray.data  # here, not at the top: training and schedules import this module without Ray Data
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class Files(Datasource):
        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, **kwargs) -> list[ReadTask]:
            return [ReadTask(lambda f=f: read(f), BlockMetadata(num_rows=None, size_bytes=None, input_files=[f],
                                                                exec_stats=None)) for f in files]

    return ray.data.read_datasource(Files(), override_num_blocks=max(1, len(files)))


def first_rows(tables: Iterator[pa.Table], rows: int | None) -> Iterator[pa.Table]:
    """The first `rows` rows of `tables` (every row for None), pulling no table past the one they end in: a
    `limit` stops reading a file there."""
    if rows is None:
        yield from tables
        return
    try:
        for t in tables:
            yield t.slice(0, rows)
            rows -= t.num_rows
            if rows <= 0:
                break
    finally:
        close = getattr(tables, "close", None)
        if close is not None:
            close()


def ray_read_parquet(files: list[str], fs: AbstractFileSystem, columns: list[str] | None = None,
                     include_row_hash: bool = False, include_paths: bool = False, head: int | None = None
                     ) -> ray.data.Dataset:
    """Parquet files through pyarrow, a row group at a time: `columns` only; `row_hash` (`parquet_row_hashes`) for
    derived ids; `path` (the file) for callers that regroup rows by file; `head`: each file's first rows only (no
    row group past them is read)."""
    def read(f: str) -> Iterator[pa.Table]:
        return first_rows(groups(f), head)

    def groups(f: str) -> Iterator[pa.Table]:
        start = 0
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            schema = pf.schema_arrow if columns is None else pa.schema([pf.schema_arrow.field(c) for c in columns])
            for i in range(pf.num_row_groups):
                yield _with_extras(pf.read_row_group(i, columns=columns), f, start, include_row_hash, include_paths)
                start += pf.metadata.row_group(i).num_rows
            if not pf.num_row_groups:  # no rows: its columns still count
                yield _with_extras(schema.empty_table(), f, 0, include_row_hash, include_paths)

    return ray_read_files(files, read)


def _with_extras(t: pa.Table, path: str, start: int, row_hash: bool, paths: bool) -> pa.Table:
    if row_hash:
        t = t.append_column("row_hash", pa.array(parquet_row_hashes(path, start, t.num_rows), pa.uint64()))
    if paths:
        t = t.append_column("path", pa.array([path] * t.num_rows, pa.string()))
    return t


def list_files(url: str, storage_options: dict, field: str = "input.path", suffixes: tuple[str, ...] = (".parquet",)
               ) -> tuple[AbstractFileSystem, list[str]]:
    """The files a URL names: itself, a glob's matches, or a folder's files ending in one of `suffixes` (none
    hidden or under `_`/`.` folders)."""
    fs, path = filesystem(url, storage_options)
    try:
        if any(c in path for c in "*?["):
            files = fs.glob(path)
        elif fs.isdir(path):
            files = [f for f in fs.find(path) if f.lower().endswith(suffixes)
                     and not any(p.startswith((".", "_")) for p in f[len(path):].split("/"))]
        elif fs.exists(path):
            files = [path]
        else:
            raise InputError(f"{field} {url!r}: no such file or directory")
    except (PermissionError, OSError) as e:
        raise InputError(f"{field} {url!r}: cannot list ({e})") from e
    if not files:
        first, *others = sorted({f".{s.split('.')[1]}" for s in suffixes}, key=lambda k: (k != ".parquet", k))
        nor = f" (nor {', '.join(others)})" if others else ""
        raise InputError(f"{field} {url!r}: no {first} files{nor} found")
    return fs, sorted(files)


def read_rows(data: str | list[str], columns: list[str], storage_options: dict | None = None,
              max_rows: int | None = None, rank: int = 0, world: int = 1) -> dict[str, list]:
    """Columns of every Parquet file under `data` (one source or several, in order; first `max_rows` rows), then
    this worker's shard."""
    listed = [list_files(d, storage_options or {}) for d in ([data] if isinstance(data, str) else data)]
    out: dict[str, list] = {c: [] for c in columns}
    for fs, f in ((fs, f) for fs, files in listed for f in files):
        with fs.open(f, "rb") as fh:
            t = pq.read_table(fh, columns=columns)
        for c in columns:
            out[c].extend(t.column(c).to_pylist())
        if max_rows and len(out[columns[0]]) >= max_rows:
            break
    n = min(len(out[columns[0]]), max_rows or 1 << 62)
    return {c: v[:n][rank::world] for c, v in out.items()}
