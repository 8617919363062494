"""Write: images first, then the batch's metadata part (in that order), in one of img2dataset's three layouts.

- `files`: one object per image at a deterministic name.
- `webdataset`: one tar per write batch (`<key>.png`, `<key>.txt` prompt, `<key>.json` metadata), staged
  under `_staging/shards/`; `pipelines.commit` numbers them `shards/<model>/{shard:05d}.tar`.
- `parquet`: the encoded image bytes ride in the metadata table itself (`image` column).

A metadata row exists only after its image was written, so a crash can leave an image without a row
(regenerated with identical bytes on resume) but never a row without an image. Parts land in
`_staging/`; `pipelines.commit` merges them into `metadata/` exactly once per sample.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid

import numpy as np
import pyarrow as pa

from pipelines.encode import EXTENSIONS, encode_image
from pipelines.storage import filesystem, full_url, is_local, join, parquet_bytes, put_atomic

STAGING = "_staging"
FORMATS = ("files", "webdataset", "parquet")
METADATA_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("model", pa.string()), ("family", pa.string()),
    ("checkpoint", pa.string()), ("sample", pa.int32()), ("seed", pa.int64()), ("image_path", pa.string()),
    ("image_key", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("image_format", pa.string()),
    ("sampling", pa.string()), ("device", pa.string()), ("node", pa.string()), ("clip_score", pa.float64()),
    ("prompt_match", pa.bool_()),
    ("judged", pa.string()), ("candidates", pa.int32()), ("candidate_index", pa.int32()),
    ("candidate_score", pa.float64()), ("image", pa.binary()),
])
SCORES = ("clip_score", "prompt_match", "judged")  # null when the job does not score


def image_relpath(model: str, row_id: str, sample: int, image_format: str) -> str:
    """images/<model>/<3 hex>/<id>-<sample>.<ext>: 4,096 prefixes keep folders under ~10k objects up to ~40M images."""
    shard = hashlib.blake2b(row_id.encode(), digest_size=2).hexdigest()[:3]
    return f"images/{model}/{shard}/{row_id}-{sample}.{EXTENSIONS[image_format]}"


def sample_member_key(row_id: str, sample: int) -> str:
    """WebDataset key (everything before the first dot of a member name): ids may hold dots, '%' never."""
    return f"{row_id.replace('.', '%2E')}_{sample}"


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """Deterministic tar (fixed mtime/owner), members in the given order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of the files in a tar, in order: the inverse of `tar_bytes`."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


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

    def __init__(self, out_url: str, storage_options: dict, image_format: str, fmt: str = "files") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
        self.out_url, self.storage_options, self.image_format, self.fmt = out_url, storage_options, image_format, fmt

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fs, root = filesystem(self.out_url, self.storage_options)
        n = len(batch["id"])
        encoded = [encode_image(im, self.image_format) for im in np.asarray(batch["pixels"])]
        cols = {k: batch[k] for k in METADATA_SCHEMA.names if k in batch}
        cols["image_format"] = np.full(n, self.image_format, object)
        for k in SCORES:
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
        put_atomic(fs, join(root, STAGING, "metadata", f"{uuid.uuid4().hex}.parquet"), parquet_bytes(table))
        models, counts = np.unique(batch["model"].astype(str), return_counts=True)
        return {"model": models, "images": counts}

    def _write_shards(self, fs, root: str, table: pa.Table, encoded: list[bytes]) -> pa.Table:
        """One staged tar per model in the batch; rows get its path."""
        ext = EXTENSIONS[self.image_format]
        rows = table.to_pylist()
        paths = [None] * len(rows)
        for model in sorted({r["model"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["model"] == model]
            members = []
            for i in idx:
                key = rows[i]["image_key"]
                members += [(f"{key}.{ext}", encoded[i]), (f"{key}.txt", rows[i]["prompt"].encode()),
                            (f"{key}.json", sample_json(rows[i]))]
            path = join(root, STAGING, "shards", model, f"{uuid.uuid4().hex}.tar")
            put_atomic(fs, path, tar_bytes(members))
            for i in idx:
                paths[i] = full_url(fs, path)
        return table.set_column(table.schema.get_field_index("image_path"), "image_path", pa.array(paths, pa.string()))
