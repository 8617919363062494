"""Reading a finished run back: its committed metadata and its images (for `evaluate` and `report`)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from promptmill.models.images import decode_image
from promptmill.pipelines.layout import SUMMARY, chooser_of, extension, run_path, tar_members
from promptmill.pipelines.metadata import SUMMARY_COLUMNS, metadata_files, read_metadata
from promptmill.pipelines.storage import filesystem, is_local_fs, join, read_json

# what report and evaluate read of every row: not judge_features (128 floats a row) nor a Parquet-format run's
# image bytes, which would hold the whole run in the driver; images are fetched for the rows shown (Run.images)
READ_COLUMNS = [*SUMMARY_COLUMNS, "prompt", "candidate_index", "image_path", "image_key", "image_format"]


class Run:
    def __init__(self, url: str, storage_options: dict | None = None, metadata: pa.Table | None = None,
                 summary: dict | None = None) -> None:
        """`metadata` / `summary`: what the caller already holds; otherwise READ_COLUMNS of the committed rows."""
        self.url = url
        self.fs, self.root = filesystem(url, storage_options)
        self.metadata = read_metadata(self.fs, self.root, READ_COLUMNS) if metadata is None else metadata
        self.summary = (read_json(self.fs, join(self.root, SUMMARY)) or {}) if summary is None else summary
        if not len(self.metadata) and not self.summary:
            raise FileNotFoundError(f"{url!r} holds no promptmill run (no metadata/ and no summary.json)")

    @property
    def models(self) -> list[str]:
        return sorted(set(self.metadata.column("model").to_pylist()))

    def rows(self, model: str, limit: int | None = None) -> pa.Table:
        t = self.metadata.filter(pc.equal(self.metadata["model"], model))
        return t.slice(0, limit) if limit else t

    def images(self, rows: pa.Table) -> list[np.ndarray]:
        """uint8 (H, W, 3) per metadata row, in row order: models of one run may draw different sizes."""
        if not len(rows):
            return []
        if "image" not in rows.column_names:
            rows = rows.append_column("image", self._inline_images(rows))
        return [decode_image(b) for b in read_image_bytes(self.fs, rows, self.root)]

    def _inline_images(self, rows: pa.Table) -> pa.Array:
        """The image bytes a Parquet-format run keeps in its metadata, for these rows only (null for an image in a
        file or a tar): each committed file read for the wanted ids (its row groups are sorted by id)."""
        keys = list(zip(*(rows.column(c).to_pylist() for c in ("model", "id", "sample"))))
        wanted = {k for k, p, m in zip(keys, rows.column("image_path").to_pylist(), rows.column("image_key").to_pylist())
                  if p is None and m is None}
        found: dict[tuple, bytes] = {}
        ids = sorted({k[1] for k in wanted})
        for f in metadata_files(self.fs, self.root)[0] if wanted else []:
            with self.fs.open(f, "rb") as fh:
                if "image" not in pq.read_schema(fh).names:
                    continue
                fh.seek(0)
                t = pq.read_table(fh, columns=["model", "id", "sample", "image"], filters=[("id", "in", ids)])
            cols = (t.column(c).to_pylist() for c in ("model", "id", "sample", "image"))
            found.update({(m, i, s): b["bytes"] if isinstance(b, dict) else b  # older runs: plain bytes
                          for m, i, s, b in zip(*cols) if (m, i, s) in wanted})
        return pa.array([found.get(k) for k in keys], pa.binary())


def inside_run(fs: AbstractFileSystem, root: str, url: str) -> str:
    """`url`'s path (relative to `root`, or an older run's absolute URL) when it lies under the run's `root` on the
    run's own store; a ValueError naming it otherwise (metadata is anyone's to edit: an image_path of another
    bucket, ../ or /dev/zero is not read)."""
    path = run_path(root, url) if "://" not in url else fs._strip_protocol(url)  # relative: under root (PATHS)
    parts = path.split("/")
    if "://" in url and fs.unstrip_protocol(path) != url or ".." in parts or "." in parts \
            or not path.startswith(root.rstrip("/") + "/"):
        raise ValueError(f"image_path {url!r} is outside the run {root!r}; not read")
    if is_local_fs(fs) and not os.path.realpath(path).startswith(os.path.realpath(root) + os.sep):
        raise ValueError(f"image_path {url!r} is a link out of the run {root!r}; not read")
    return path


def read_image_bytes(fs: AbstractFileSystem, rows: pa.Table, root: str) -> list[bytes]:
    """Encoded images of metadata rows, whatever the output format (files, webdataset, parquet); only paths
    inside the run's `root` are read."""
    inline = [b["bytes"] if isinstance(b, dict) else b for b in rows.column("image").to_pylist()]  # Image or bytes
    paths = rows.column("image_path").to_pylist()
    keys = rows.column("image_key").to_pylist()
    where = {p: inside_run(fs, root, p) for p, b in zip(paths, inline) if b is None and p}
    needed = sorted(set(where.values()))
    got = fs.cat(needed) if needed else {}  # s3fs: concurrent GETs
    members: dict[str, dict[str, bytes]] = {}
    out = []
    for b, p, k, fmt in zip(inline, paths, keys, rows.column("image_format").to_pylist()):
        if b is not None:
            out.append(b)
        elif k is None:
            out.append(got[where[p]])
        else:  # a WebDataset member
            tar = where[p]
            if tar not in members:
                members[tar] = dict(tar_members(got[tar]))
            out.append(members[tar][f"{k}.{extension(fmt)}"])
    return out


def _count_true(t: pa.Table, column: str) -> int | None:
    """Rows where `column` is true; None when every row is null (the model cannot tell: not a zero)."""
    if column not in t.column_names or t[column].null_count == len(t):
        return None
    return int(pc.sum(pc.cast(pc.fill_null(t[column], False), pa.int64())).as_py() or 0)


def score_summary(metadata: pa.Table) -> dict[str, dict]:
    """Per model: images, mean clip_score, prompt-match rate over in-domain prompts, rerank settings ("best of 4 by
    prompt_match"), and over its prompts with several samples the mean diversity and near-duplicate rate."""
    out = {}
    for model in sorted(set(metadata.column("model").to_pylist())):
        t = metadata.filter(pc.equal(metadata["model"], model))
        clip = [v for v in t.column("clip_score").to_pylist() if v is not None]
        match = [v for v in t.column("prompt_match").to_pylist() if v is not None]
        candidates = [c for c in t.column("candidates").to_pylist() if c is not None]
        aesthetic = [v for v in (t["aesthetic_score"].to_pylist() if "aesthetic_score" in t.column_names else [])
                     if v is not None]  # a run from before the column
        out[model] = {"images": len(t), "clip_score_mean": round(float(np.mean(clip)), 4) if clip else None,
                      "aesthetic_mean": round(float(np.mean(aesthetic)), 4) if aesthetic else None,
                      "prompt_match": round(float(np.mean(match)), 4) if match else None,
                      "prompt_match_n": len(match), "candidates": max(candidates, default=None),
                      "rerank": rerank_line(t),
                      **diversity_summary(t),
                      **{f"{flag}_images": _count_true(t, flag) for flag in ("nsfw", "prompt_truncated")}}
    return out


def rerank_line(table: pa.Table) -> str | None:
    """How one model's kept images were chosen, e.g. "best of 4 by prompt_match"; None when each was the only draw."""
    by = (table["rerank_by"].to_pylist() if "rerank_by" in table.column_names  # a run from before the column
          else [None] * len(table))
    ways = {(k, chooser_of(k, b)) for k, b in zip(table["candidates"].to_pylist(), by) if chooser_of(k, b)}
    return "; ".join(f"best of {k} by {b}" for k, b in sorted(ways)) or None


def diversity_summary(table: pa.Table) -> dict:
    """One model's figures over its prompts with two or more scored samples: mean diversity, and the share of
    those prompts with at least one near-duplicate pair."""
    per: dict[str, list] = {}  # id -> [diversity, any near-duplicate (None: unknown)]
    for i, d, n in zip(*(table.column(c).to_pylist() for c in ("id", "diversity", "near_duplicate"))):
        if d is not None:
            seen = per.setdefault(i, [d, None])
            if n is not None:
                seen[1] = bool(seen[1]) or n
    flagged = [n for _, n in per.values() if n is not None]
    return {"diversity_mean": round(float(np.mean([d for d, _ in per.values()])), 4) if per else None,
            "near_duplicate_rate": round(float(np.mean(flagged)), 4) if flagged else None,
            "prompts_with_samples": len(per)}
