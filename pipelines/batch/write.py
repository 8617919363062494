"""Write: images first, then the batch's metadata part (in that order), in any layout (`writers`).

A metadata row exists only after its image was written, so a crash can leave an image without a row
(regenerated with identical bytes on resume) but never a row without an image. Parts land in
`_staging/`; `pipelines.batch.commit` merges them into `metadata/` exactly once per sample.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from promptmill.pipelines.batch.writers import layout_writer
from promptmill.pipelines.c2pa_signing import signer
from promptmill.pipelines.layout import (
    DERIVED,
    METADATA,
    METADATA_SCHEMA,
    PER_IMAGE,
    REJECTED,
    SCORES,
    STAGING,
    encode_image,
    staged_part_name,
)
from promptmill.pipelines.provenance import FIELDS
from promptmill.pipelines.storage import Location, join, parquet_bytes, put_atomic

if TYPE_CHECKING:
    from promptmill.pipelines.spec import C2paSpec

ERROR_REASONS = ("generation_error", "non_finite_output")  # count against output.max_error_fraction


def _column(values, type_: pa.DataType | None = None) -> pa.Array:
    """Nullable columns cross Ray as NaN-filled floats (None in an object column becomes NaN, a bool column
    with nulls becomes float32): back to null and to the declared type (inferred when None: input columns)."""
    vals = [None if isinstance(v, float | np.floating) and np.isnan(v) else v for v in values]
    if type_ is not None and pa.types.is_boolean(type_):
        vals = [None if v is None else bool(v) for v in vals]
    return pa.array(vals, type_)


class WriteStage:
    """Plain function stage (tasks, not actors); returns one count row per model in the batch for progress."""

    def __init__(self, out: Location, image_format: str, fmt: str = "files", provenance: bool = True,
                 keep: tuple[str, ...] = (), sidecars: bool = False, token: str = "", c2pa: C2paSpec | None = None) -> None:
        self.out, self.image_format = out, image_format
        self.layout = layout_writer(fmt, out, image_format, sidecars)
        self.provenance, self.keep = provenance, keep
        self.token = token  # the output lease's fencing token: the commit takes only this run's parts
        self.c2pa = c2pa  # where the key is, not the key: each worker process loads it once (`c2pa_signing.signer`)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fs, root = self.out.fs, self.out.root
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
        if self.c2pa is not None:  # signed last, over the bytes as written: sha256 below is of the signed file
            sign = signer(self.c2pa).sign
            encoded = [sign(b, self.image_format, provenance(batch, i)) for i, b in enumerate(encoded)]
        cols = {k: batch[k] for k in METADATA_SCHEMA.names if k in batch}
        cols["sha256"] = [hashlib.sha256(b).hexdigest() for b in encoded]  # of the file as written
        cols["image_format"] = np.full(n, self.image_format, object)
        for k in (*SCORES, *DERIVED, *PER_IMAGE):
            cols.setdefault(k, [None] * n)
        cols.update({k: [None] * n for k in ("image_key", "image", "image_path")})  # the layout's to fill
        table = pa.table({k: _column(cols[k], METADATA_SCHEMA.field(k).type) for k in METADATA_SCHEMA.names})
        for c in self.keep:  # input.keep_columns, after ours
            table = table.append_column(c, _column(batch[c].tolist()))
        table = self.layout.store(table, encoded)
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


def provenance(batch: dict[str, np.ndarray], i: int) -> dict[str, str]:
    """Row i's provenance fields (what made the image), as text for the file's metadata."""
    return {k: str(batch[k][i]) for k in FIELDS if k in batch and batch[k][i] is not None}
