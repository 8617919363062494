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

import hashlib
import json
import uuid

import numpy as np
import pyarrow as pa
from promptmill.pipelines.layout import (
    DERIVED,
    METADATA,
    METADATA_SCHEMA,
    OUTPUT_FORMATS,
    PER_IMAGE,
    REJECTED,
    SCORES,
    SHARDS,
    STAGING,
    encode_image,
    extension,
    image_relpath,
    sample_member_key,
    staged_part_name,
    tar_bytes,
)
from promptmill.pipelines.provenance import FIELDS
from promptmill.pipelines.retry import RetryPolicy
from promptmill.pipelines.storage import filesystem, full_url, is_local, join, parquet_bytes, put_atomic

ERROR_REASONS = ("generation_error", "non_finite_output")  # count against output.max_error_fraction


def sample_json(row: dict) -> bytes:
    return json.dumps({k: v for k, v in row.items() if k not in ("image", "image_path")}, sort_keys=True,
                      default=str).encode()


def _column(values, type_: pa.DataType | None = None) -> pa.Array:
    """Nullable columns cross Ray as NaN-filled floats (None in an object column becomes NaN, a bool column
    with nulls becomes float32): back to null and to the declared type (inferred when None: input columns)."""
    vals = [None if isinstance(v, float | np.floating) and np.isnan(v) else v for v in values]
    if type_ is not None and pa.types.is_boolean(type_):
        vals = [None if v is None else bool(v) for v in vals]
    return pa.array(vals, type_)


class WriteStage:
    """Plain function stage (tasks, not actors); returns one count row per model in the batch for progress."""

    def __init__(self, out_url: str, storage_options: dict, image_format: str, fmt: str = "files",
                 retry: RetryPolicy | None = None, provenance: bool = True, keep: tuple[str, ...] = (),
                 sidecars: bool = False, token: str = "") -> None:
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
        self.out_url, self.storage_options, self.image_format, self.fmt = out_url, storage_options, image_format, fmt
        self.retry = retry  # the job's storage.retry, carried to the worker with the stage
        self.provenance, self.keep, self.sidecars = provenance, keep, sidecars
        self.token = token  # the output lease's fencing token: the commit takes only this run's parts

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fs, root = filesystem(self.out_url, self.storage_options, self.retry)
        errors = batch.get("generation_error")
        # a text per failed row; Ray Data may turn a column of only None into NaN, so "failed" means "has a text"
        failed = [] if errors is None else [i for i, e in enumerate(errors) if isinstance(e, str)]
        counts = self._reject(fs, root, batch, failed) if failed else {}
        if failed:
            keep = np.array([not isinstance(e, str) for e in errors])
            batch = {k: np.asarray(v)[keep] for k, v in batch.items()}
        n = len(batch["id"])
        if n == 0:
            return self._counts(batch, counts)
        encoded = [encode_image(im, self.image_format, provenance(batch, i) if self.provenance else None)
                   for i, im in enumerate(np.asarray(batch["pixels"]))]
        cols = {k: batch[k] for k in METADATA_SCHEMA.names if k in batch}
        cols["sha256"] = [hashlib.sha256(b).hexdigest() for b in encoded]  # of the file as written
        cols["image_format"] = np.full(n, self.image_format, object)
        for k in (*SCORES, *DERIVED, *PER_IMAGE):
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
        for c in self.keep:  # input.keep_columns, after ours
            table = table.append_column(c, _column(batch[c].tolist()))
        if self.fmt == "files" and self.sidecars:  # img2dataset's <key>.txt / <key>.json beside the image
            side = {}
            for path, row in zip(paths, table.to_pylist()):
                stem = path.rsplit(".", 1)[0]
                side[f"{stem}.txt"], side[f"{stem}.json"] = row["prompt"].encode(), sample_json(row)
            fs.pipe(side)
        if self.fmt == "webdataset":
            table = self._write_shards(fs, root, table, encoded)
        put_atomic(fs, join(root, STAGING, METADATA, staged_part_name(self.token)), parquet_bytes(table))
        return self._counts(batch, counts)

    @staticmethod
    def _counts(batch: dict[str, np.ndarray], rejected: dict[str, dict]) -> dict[str, np.ndarray]:
        """One row per model: images written, rows rejected as errors (ERROR_REASONS), the first error's text, and
        every rejected row by reason (JSON)."""
        written = dict(zip(*np.unique(np.asarray(batch["model"]).astype(str), return_counts=True)))
        models = sorted({*written, *rejected})
        none: dict = {"reasons": {}, "first": None}
        return {"model": np.array(models, object), "images": np.array([int(written.get(m, 0)) for m in models]),
                "errors": np.array([sum(n for r, n in rejected.get(m, none)["reasons"].items() if r in ERROR_REASONS)
                                    for m in models]),
                "first_error": np.array([rejected.get(m, none)["first"] for m in models], object),
                "rejected": np.array([json.dumps(rejected.get(m, none)["reasons"]) for m in models], object)}

    @staticmethod
    def _reject(fs, root: str, batch: dict[str, np.ndarray], rows: list[int]) -> dict[str, dict]:
        """Rows the generator did not give an image to keep: to rejected/ with their reason (`reject_reason`:
        generation_error when it failed on them alone twice, non_finite_output, nsfw, prompt_too_many_tokens)
        and the text. Returns per model {"reasons": {reason: rows}, "first": the first error's text}."""
        given = batch.get("reject_reason")
        reasons = [given[i] if given is not None and isinstance(given[i], str) else "generation_error" for i in rows]
        t = pa.table({"id": pa.array([str(batch["id"][i]) for i in rows]),
                      "prompt": pa.array([str(batch["prompt"][i]) for i in rows]),
                      "model": pa.array([str(batch["model"][i]) for i in rows]),
                      "sample": pa.array([int(batch["sample"][i]) for i in rows], pa.int32()),
                      "seed": pa.array([int(batch["seed"][i]) for i in rows], pa.int64()),
                      "reason": pa.array(reasons),
                      "error": pa.array([str(batch["generation_error"][i]) for i in rows])})
        put_atomic(fs, join(root, STAGING, REJECTED, f"generation-{uuid.uuid4().hex}.parquet"), parquet_bytes(t))
        out: dict[str, dict] = {}
        for i, reason in zip(rows, reasons):
            m = out.setdefault(str(batch["model"][i]), {"reasons": {}, "first": None})
            m["reasons"][reason] = m["reasons"].get(reason, 0) + 1
            if reason in ERROR_REASONS and m["first"] is None:
                m["first"] = str(batch["generation_error"][i])
        return out

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


def provenance(batch: dict[str, np.ndarray], i: int) -> dict[str, str]:
    """Row i's provenance fields (what made the image), as text for the file's metadata."""
    return {k: str(batch[k][i]) for k in FIELDS if k in batch and batch[k][i] is not None}
