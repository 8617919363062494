"""Model directories from any fsspec URL: copied once per node into a local cache (Hugging Face loaders want a
local directory), keyed by the URL and each file's size and etag, so weights replaced in place are a new copy;
and identified by content (`content_id`), so an output never mixes two models that share a path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import fsspec
from promptmill.models.errors import CheckpointError

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
    listing = _listing(fs, root)
    if not listing:
        raise CheckpointError(f"checkpoint {url!r}: no files there")
    for p, _, _ in listing:
        safe_relpath(p, url)  # every key first: a prefix with one unsafe key is refused before a byte is copied
    key = hashlib.blake2b(json.dumps([url, listing]).encode(), digest_size=12).hexdigest()
    dest = cache_dir() / key
    if (dest / DONE).exists():
        return str(dest)
    tmp = cache_dir() / f".{key}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for p, _, _ in listing:
            local = tmp.joinpath(*safe_relpath(p, url).split("/"))
            if not local.resolve().is_relative_to(tmp.resolve()):  # a link planted in the cache: still refused
                raise CheckpointError(f"checkpoint {url!r}: key {p!r} resolves outside the local copy")
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get(root + p, str(local))
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


def safe_relpath(key: str, url: str) -> str:
    """The path under the copy for `key` (a listing's path below the prefix, "/" first). Object keys are literal
    strings: one holding `..`, `.`, an empty part, a backslash or a control character could name a file outside
    the copy (a `.pth` in site-packages runs on every interpreter start), so the whole prefix is refused."""
    rel = key[1:] if key.startswith("/") else key
    parts = rel.split("/")
    bad = (not rel or any(part in ("", ".", "..") for part in parts) or "\\" in rel
           or any(ord(c) < 32 or c == "\x7f" for c in rel))
    if bad:
        raise CheckpointError(f"checkpoint {url!r}: unsafe key {key!r} in the prefix (empty, absolute, '.' or '..' "
                              "parts, a backslash or a control character); nothing was copied. Remove or rename it")
    return rel


def _listing(fs, root: str) -> list[tuple[str, int, str]]:
    """(path under root, size, etag) of every file, sorted; the console's zero-byte "folder/" markers are not files."""
    return sorted((p[len(root):], info.get("size"), str(info.get("ETag") or info.get("etag") or ""))
                  for p, info in fs.find(root, detail=True).items()
                  if not (p.endswith("/") and not info.get("size")))


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> content digest: hash a file once


def _file_digest(path: Path) -> str:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.blake2b(digest_size=16)
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def content_id(url: str, storage_options: dict | None = None) -> str:
    """A model directory's identity by content: every file's bytes hashed where it is local; size and etag where
    it is in an object store (S3's etag changes with the bytes). Not its path: weights replaced in place under the
    same path are another model (the job refuses to add them to an output the old ones wrote)."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        base = Path(root)
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file() and p.name != DONE)
        entries = [(str(p.relative_to(base)) if p != base else p.name, _file_digest(p)) for p in files]
    else:  # a plugin's checkpoint may be one object or an empty prefix its family fills in: list what is there
        entries = _listing(fs, root.rstrip("/"))
    return hashlib.blake2b(json.dumps(entries).encode(), digest_size=8).hexdigest()


PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickled_weights(local: str, url: str) -> None:
    """Weights only as safetensors: a folder holding pickled weights with no safetensors beside them is refused,
    with how to convert it (loading a pickle can run any code its author put in it)."""
    files = [p for p in Path(local).rglob("*") if p.is_file()]
    pickled = sorted(str(p.relative_to(local)) for p in files if p.suffix in PICKLED)
    folders_with_safetensors = {p.parent for p in files if p.suffix == ".safetensors"}
    unconverted = [f for f in pickled if (Path(local) / f).parent not in folders_with_safetensors]
    if unconverted:
        raise CheckpointError(
            f"checkpoint {url!r}: {', '.join(unconverted[:5])} hold pickled weights, and promptmill loads "
            "safetensors only (a pickle can run code when loaded). Convert once where you trust the file, e.g. "
            "`DiffusionPipeline.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)` (or the "
            "model's own `save_pretrained(..., safe_serialization=True)`), and point the spec at OUT")
