"""Write: images first, then the batch's metadata part (in that order), in one of img2dataset's three layouts.

- `files`: one object per image at a deterministic name.
- `webdataset`: one tar per write batch (`<key>.png`, `<key>.txt` prompt, `<key>.json` metadata), staged
  under `_staging/shards/`; `pipelines.batch.commit` numbers them `shards/<model>/{shard:05d}.tar`.
- `parquet`: the encoded image bytes ride in the metadata table itself (`image` column).

A metadata row exists only after its image was written, so a crash can leave an image without a row
(regenerated with identical bytes on resume) but never a row without an image. Parts land in
`_staging/`; `pipelines.batch.commit` merges them into `metadata/` exactly once per sample.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pyarrow as pa

from pipelines.layout import (
    DERIVED,
    METADATA,
    METADATA_SCHEMA,
    OUTPUT_FORMATS,
    SCORES,
    SHARDS,
    STAGING,
    encode_image,
    extension,
    image_relpath,
    sample_member_key,
    tar_bytes,
)
from pipelines.retry import RetryPolicy
from pipelines.storage import filesystem, full_url, is_local, join, parquet_bytes, put_atomic


def sample_json(row: dict) -> bytes:
    return json.dumps({k: v for k, v in row.items() if k not in ("image", "image_path")}, sort_keys=True,
                      default=str).encode()


def _column(values, type_: pa.DataType) -> pa.Array:
    """Nullable columns cross Ray as NaN-filled floats (None in an object column becomes NaN, a bool column
    with nulls becomes float32): back to null and to the declared type."""
    vals = [None if isinstance(v, float | np.floating) and np.isnan(v) else v for v in values]
    if pa.types.is_boolean(type_):
        vals = [None if v is None else bool(v) for v in vals]
    return pa.array(vals, type_)


class WriteStage:
    """Plain function stage (tasks, not actors); returns one count row per model in the batch for progress."""

    def __init__(self, out_url: str, storage_options: dict, image_format: str, fmt: str = "files",
                 retry: RetryPolicy | None = None) -> None:
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
        self.out_url, self.storage_options, self.image_format, self.fmt = out_url, storage_options, image_format, fmt
        self.retry = retry  # the job's storage.retry, carried to the worker with the stage

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fs, root = filesystem(self.out_url, self.storage_options, self.retry)
        n = len(batch["id"])
        encoded = [encode_image(im, self.image_format) for im in np.asarray(batch["pixels"])]
        cols = {k: batch[k] for k in METADATA_SCHEMA.names if k in batch}
        cols["image_format"] = np.full(n, self.image_format, object)
        for k in (*SCORES, *DERIVED):
            cols.setdefault(k, [None] * n)
        cols["image_key"] = [None] * n
        cols["image"] = [None] * n
        if self.fmt == "files":
            paths = [join(root, image_relpath(m, i, int(s), self.image_format))
                     for m, i, s in zip(batch["model"], batch["id"], batch["sample"])]
            if is_local(self.out_url):
                for d in {p.rsplit("/", 1)[0] for p in paths}:
                    fs.makedirs(d, exist_ok=True)
            fs.pipe(dict(zip(paths, encoded)))  # s3fs: concurrent PUTs
            cols["image_path"] = np.array([full_url(fs, p) for p in paths], object)
        elif self.fmt == "parquet":
            cols["image"] = encoded
            cols["image_path"] = [None] * n
        else:
            cols["image_key"] = [sample_member_key(str(i), int(s)) for i, s in zip(batch["id"], batch["sample"])]
            cols["image_path"] = [None] * n
        table = pa.table({k: _column(cols[k], METADATA_SCHEMA.field(k).type) for k in METADATA_SCHEMA.names})
        if self.fmt == "webdataset":
            table = self._write_shards(fs, root, table, encoded)
        put_atomic(fs, join(root, STAGING, METADATA, f"{uuid.uuid4().hex}.parquet"), parquet_bytes(table))
        models, counts = np.unique(batch["model"].astype(str), return_counts=True)
        return {"model": models, "images": counts}

    def _write_shards(self, fs, root: str, table: pa.Table, encoded: list[bytes]) -> pa.Table:
        """One staged tar per model in the batch; rows get its path."""
        ext = extension(self.image_format)
        rows = table.to_pylist()
        paths = [None] * len(rows)
        for model in sorted({r["model"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["model"] == model]
            members = []
            for i in idx:
                key = rows[i]["image_key"]
                members += [(f"{key}.{ext}", encoded[i]), (f"{key}.txt", rows[i]["prompt"].encode()),
                            (f"{key}.json", sample_json(rows[i]))]
            path = join(root, STAGING, SHARDS, model, f"{uuid.uuid4().hex}.tar")
            put_atomic(fs, path, tar_bytes(members))
            for i in idx:
                paths[i] = full_url(fs, path)
        return table.set_column(table.schema.get_field_index("image_path"), "image_path", pa.array(paths, pa.string()))
