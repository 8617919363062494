"""Write: images to deterministic object names, then the batch's metadata part (in that order).

A metadata row exists only after its image was written, so a crash can leave an image without a row
(regenerated with identical bytes on resume) but never a row without an image. Parts land in
`_staging/`; `pipelines.commit` merges them into `metadata/` exactly once per sample.
"""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pyarrow as pa

from pipelines.encode import EXTENSIONS
from pipelines.storage import filesystem, full_url, is_local, join, parquet_bytes, put_atomic

STAGING = "_staging"
METADATA_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("model", pa.string()), ("family", pa.string()),
    ("checkpoint", pa.string()), ("sample", pa.int32()), ("seed", pa.int64()), ("image_path", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("image_format", pa.string()), ("sampling", pa.string()),
    ("device", pa.string()), ("clip_score", pa.float64()), ("prompt_match", pa.bool_()),
])


def image_relpath(model: str, row_id: str, sample: int, image_format: str) -> str:
    """images/<model>/<3 hex>/<id>-<sample>.<ext>: 4,096 prefixes keep folders under ~10k objects up to ~40M images."""
    shard = hashlib.blake2b(row_id.encode(), digest_size=2).hexdigest()[:3]
    return f"images/{model}/{shard}/{row_id}-{sample}.{EXTENSIONS[image_format]}"


class WriteStage:
    """Plain function stage (tasks, not actors); returns one count row per batch for progress."""

    def __init__(self, out_url: str, storage_options: dict, image_format: str) -> None:
        self.out_url, self.storage_options, self.image_format = out_url, storage_options, image_format

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fs, root = filesystem(self.out_url, self.storage_options)
        n = len(batch["id"])
        paths = [join(root, image_relpath(m, i, int(s), self.image_format))
                 for m, i, s in zip(batch["model"], batch["id"], batch["sample"])]
        if is_local(self.out_url):
            for d in {p.rsplit("/", 1)[0] for p in paths}:
                fs.makedirs(d, exist_ok=True)
        fs.pipe(dict(zip(paths, (bytes(b) for b in batch["image"]))))  # s3fs: concurrent PUTs
        cols = {k: batch[k] for k in METADATA_SCHEMA.names if k in batch}
        cols["image_path"] = np.array([full_url(fs, p) for p in paths], object)
        cols["image_format"] = np.full(n, self.image_format, object)
        cols["clip_score"] = [None] * n
        cols["prompt_match"] = [None] * n
        table = pa.table({k: pa.array(list(cols[k]), METADATA_SCHEMA.field(k).type) for k in METADATA_SCHEMA.names})
        put_atomic(fs, join(root, STAGING, "metadata", f"{uuid.uuid4().hex}.parquet"), parquet_bytes(table))
        models, counts = np.unique(batch["model"].astype(str), return_counts=True)
        return {"model": models, "images": counts}
