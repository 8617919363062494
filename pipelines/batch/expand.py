"""Expand accepted prompts into samples (id x model x sample index) with batch-independent seeds."""

from __future__ import annotations

import hashlib

import pyarrow as pa
from promptmill.pipelines.batch.validate import ID, REASON, column_values, prompt_text
from promptmill.pipelines.layout import sample_key


def image_seed(job_seed: int, row_id: str, model: str, sample: int) -> int:
    """Stable 63-bit seed: the same (seed, id, model, sample) gives the same pixels on any machine."""
    h = hashlib.blake2b(f"{job_seed}\x1f{row_id}\x1f{model}\x1f{sample}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


def expand_batch(table: pa.Table, *, prompt_column: str, model: str, images_per_prompt: int,
                 job_seed: int, done: frozenset[str] = frozenset(), keep: tuple[str, ...] = ()) -> pa.Table:
    """Accepted rows -> one row per (id, model, sample) not in `done`. The job passes no `done`: what is already
    written leaves on Ray Data (`pipelines.batch.resume`), not in a set shipped with every task."""
    ids, prompts, samples, seeds, rows = [], [], [], [], []
    reasons = table.column(REASON).to_pylist()
    for row, (rid, p, r) in enumerate(zip(table.column(ID).to_pylist(), column_values(table.column(prompt_column)),
                                          reasons)):
        if r is not None:
            continue
        for k in range(images_per_prompt):
            if sample_key(rid, model, k) in done:
                continue
            ids.append(rid)
            prompts.append(prompt_text(p))
            samples.append(k)
            seeds.append(image_seed(job_seed, rid, model, k))
            rows.append(row)
    out = pa.table({"id": pa.array(ids, pa.string()), "prompt": pa.array(prompts, pa.string()),
                    "sample": pa.array(samples, pa.int32()), "seed": pa.array(seeds, pa.int64())})
    for c in keep:  # the input's own columns (input.keep_columns), one value per sample of the row
        out = out.append_column(c, table.column(c).take(pa.array(rows, pa.int64())))
    return out
