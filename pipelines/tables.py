"""Parquet tables on any fsspec URL: find the files under a path, read columns. Shared by the job's reader,
training, evaluation and schedules (never imports the job or training code)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from promptmill.pipelines.storage import arrow_fs, filesystem

if TYPE_CHECKING:
    import ray.data


class InputError(ValueError):
    """Input that cannot be read at all; the message names the file and column."""


def ray_read_parquet(files: list[str], fs: AbstractFileSystem, **kwargs) -> ray.data.Dataset:
    """`ray.data.read_parquet` of these files, with Ray Data's first Parquet reader. Ray 2.60's default (datasource
    v2) first starts a FooterReader actor to read footers the caller has already checked: a job's read of 64
    prompts in a fresh Ray took 2.4-5.0 s with it, 0.8-0.9 s without (same rows, same row_hash; the start-up
    benchmark, benchmarks/startup.py, shows it per job)."""
    import ray.data  # here, not at the top: training and schedules import this module without Ray Data

    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False  # read_parquet picks its reader when called
    try:
        return ray.data.read_parquet(files, filesystem=arrow_fs(fs), file_extensions=None, **kwargs)
    finally:
        ctx.use_datasource_v2 = v2


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
