"""`promptmill evaluate RUN_URL --reference URL`: job-level metrics of a finished run, into summary.json."""

from __future__ import annotations

import numpy as np
from promptmill.models.images import decode_image
from promptmill.models.judge import load_judge
from promptmill.pipelines.batch.commit import write_json
from promptmill.pipelines.layout import SUMMARY
from promptmill.pipelines.runs.metrics import compare
from promptmill.pipelines.runs.results import Run
from promptmill.pipelines.storage import join
from promptmill.pipelines.tables import read_rows


def read_reference(url: str, storage_options: dict | None, image_column: str, rows: int) -> list[np.ndarray]:
    r = read_rows(url, [image_column], storage_options, max_rows=rows)[image_column]
    if len(r) < 4:
        raise ValueError(f"reference {url!r}: {len(r)} images in column {image_column!r}; need at least 4")
    return [decode_image(b) for b in r]


def evaluate_run(run: Run, reference: str, judge_url: str, *, max_images: int = 2000,
                 reference_storage_options: dict | None = None, image_column: str = "png",
                 judge_storage_options: dict | None = None) -> dict:
    """Per model metrics vs the first half of the reference, beside the real-vs-real floor; written into
    the run's summary.json under `metrics`."""
    judge = load_judge(judge_url, storage_options=judge_storage_options)
    ref = read_reference(reference, reference_storage_options, image_column, 2 * max_images)
    images = {m: run.images(run.rows(m, max_images)) for m in run.models}
    metrics = {"reference": reference, "features": f"judge penultimate layer ({judge_url})",
               "models": compare(judge, ref, {m: v for m, v in images.items() if len(v) >= 2})}
    run.summary["metrics"] = metrics
    write_json(run.fs, join(run.root, SUMMARY), run.summary)
    return metrics
