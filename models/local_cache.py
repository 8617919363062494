"""Model directories from any fsspec URL, copied once per node into a local cache (Hugging Face loaders want a
local directory). Keyed by the URL and each file's size and etag, so weights replaced in place are a new copy."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import fsspec

from models.checkpoint import CheckpointError

DONE = ".promptmill-complete"


def cache_dir() -> Path:
    return Path(os.environ.get("PROMPTMILL_CACHE", Path.home() / ".cache" / "promptmill")) / "models"


def local_copy(url: str, storage_options: dict | None = None) -> str:
    """A local directory holding the pipeline: the path itself when local, else a per-node cached copy keyed by
    URL + each file's size and etag (a replaced weight file is a new key), written to a temporary name and renamed
    (two actors on one node copy at most twice, never into each other)."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return root
    files = fs.find(root, detail=True)
    if not files:
        raise CheckpointError(f"checkpoint {url!r}: no files there")
    listing = sorted((p[len(root):], info.get("size"), str(info.get("ETag") or info.get("etag") or ""))
                     for p, info in files.items())
    key = hashlib.blake2b(json.dumps([url, listing]).encode(), digest_size=12).hexdigest()
    dest = cache_dir() / key
    if (dest / DONE).exists():
        return str(dest)
    tmp = cache_dir() / f".{key}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for p, _, _ in listing:
            (tmp / p.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            fs.get(root + p, str(tmp / p.lstrip("/")))
        (tmp / DONE).touch()
        if dest.exists() and not (dest / DONE).exists():
            shutil.rmtree(dest, ignore_errors=True)  # an unfinished copy (an older version's, or a crash's): ours
        tmp.rename(dest)
    except OSError:
        if not (dest / DONE).exists():  # losing the rename to another actor's identical copy is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(dest)
