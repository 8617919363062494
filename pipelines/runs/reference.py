"""`promptmill evaluate RUN_URL --reference URL`: job-level metrics of a finished run, into summary.json."""

from __future__ import annotations

import numpy as np
from promptmill.models.images import decode_image
from promptmill.models.judge import load_judge
from promptmill.pipelines.layout import SUMMARY
from promptmill.pipelines.redaction import redact_text
from promptmill.pipelines.runs.metrics import CLIPFeatures, compare
from promptmill.pipelines.runs.results import Run
from promptmill.pipelines.storage import join, write_json
from promptmill.pipelines.tables import read_rows


def read_reference(url: str, storage_options: dict | None, image_column: str, rows: int) -> list[np.ndarray]:
    r = read_rows(url, [image_column], storage_options, max_rows=rows)[image_column]
    if len(r) < 4:
        raise ValueError(f"reference {url!r}: {len(r)} images in column {image_column!r}; need at least 4")
    return [decode_image(b) for b in r]


def evaluate_run(run: Run, reference: str, judge_url: str | None, *, max_images: int = 2000,
                 reference_storage_options: dict | None = None, image_column: str = "png",
                 judge_storage_options: dict | None = None, clip_url: str | None = None) -> dict:
    """Per model metrics vs the first half of the reference, beside the real-vs-real floor; written into
    the run's summary.json under `metrics`. The feature space: the judge's (our shapes models), else the CLIP's
    image embeddings (`clip_url`: any images; Fréchet distance and KID in CLIP space, no Inception Score)."""
    if judge_url:
        judge, features, space = load_judge(judge_url, storage_options=judge_storage_options), None, \
            f"judge penultimate layer ({redact_text(judge_url)})"
    elif clip_url:
        from promptmill.models.clip_loader import load_clip

        judge, space = None, f"CLIP image embeddings ({redact_text(clip_url)})"
        features = CLIPFeatures(load_clip(clip_url, storage_options=judge_storage_options))
    else:
        raise ValueError("metrics need a feature space: a judge or a CLIP")
    ref = read_reference(reference, reference_storage_options, image_column, 2 * max_images)
    images = {m: run.images(run.rows(m, max_images)) for m in run.models}
    metrics = {"reference": reference, "features": space,
               "models": compare(judge, ref, {m: v for m, v in images.items() if len(v) >= 2}, features)}
    run.summary["metrics"] = metrics
    write_json(run.fs, join(run.root, SUMMARY), run.summary)
    return metrics
