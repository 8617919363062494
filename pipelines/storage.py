"""One path to storage for local disk and S3 alike: fsspec (s3fs reads AWS_ENDPOINT_URL & co itself)."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from promptmill.pipelines.retry import RetryingFS, RetryPolicy
from pyarrow.fs import FSSpecHandler, PyFileSystem


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def absolute(url: str) -> str:
    """Local paths become absolute (Ray workers may not share the driver's cwd); URLs are kept."""
    if url.startswith("file://"):
        url = url[len("file://"):]
    return os.path.abspath(os.path.expanduser(url)) if is_local(url) else url.rstrip("/")


def filesystem(url: str, storage_options: dict | None = None,
               retry: RetryPolicy | None = None) -> tuple[AbstractFileSystem, str]:
    """(fs, path-without-protocol) for `url`; every storage call on fs retries transient errors (`retry`, else
    the process's policy: `pipelines.retry`)."""
    fs, path = fsspec.core.url_to_fs(absolute(url), **(storage_options or {}))
    return RetryingFS(fs, retry), path


@dataclass(frozen=True)
class Location:
    """A folder on any storage, opened once: its retrying filesystem and root path. Passed down whole (and pickled
    to Ray workers: the filesystem carries its retry policy) instead of a URL every stage opens again."""

    fs: AbstractFileSystem
    root: str

    @classmethod
    def open(cls, url: str, storage_options: dict | None = None) -> Location:
        """Opened with this process's retry policy (`retry.use_policy`), which the filesystem then keeps."""
        return cls(*filesystem(url, storage_options))

    def path(self, *parts: str) -> str:
        return join(self.root, *parts)


def full_url(fs: AbstractFileSystem, path: str) -> str:
    """The URL a user can open again: s3://bucket/key for S3, the absolute path for local disk."""
    return fs.unstrip_protocol(path) if not is_local_fs(fs) else path


def is_local_fs(fs: AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def arrow_fs(fs: AbstractFileSystem) -> PyFileSystem:
    """pyarrow view of an fsspec filesystem, for Ray Data readers (pyarrow's own S3 ignores AWS_ENDPOINT_URL)."""
    return PyFileSystem(FSSpecHandler(fs))


def join(*parts: str) -> str:
    return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))


def put_atomic(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers never see a half-written file: write `<path>.tmp`, then rename (an S3 PUT is atomic anyway).

    Found by the killed-driver test: a part cut off mid-write made the resume unreadable. The temporary name is
    unique: two writers of one path must not write into each other's temporary file.
    """
    if is_local_fs(fs):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex[:12]}.tmp"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def write_json(fs: AbstractFileSystem, path: str, obj: Any) -> None:
    """JSON a person reads (summary, spec record): indented, keys sorted."""
    fs.pipe(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(fs: AbstractFileSystem, path: str) -> Any:
    """The JSON at `path`, or None where there is none."""
    return json.loads(fs.cat_file(path)) if fs.exists(path) else None

