"""`promptmill generate --dry-run`: what a run would do, with nothing written.

The same preflight and validation as the run (so a bad spec, input or checkpoint fails the same way), then the
counts a user checks before paying for GPUs: rows, rejected by reason, images per model, and how many of those
the output already holds (a rerun draws only the rest). Counted on Ray Data: the driver gathers counts, not ids.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from promptmill.pipelines.batch.aggregate import count_by
from promptmill.pipelines.batch.inputs import input_changes
from promptmill.pipelines.batch.job import open_output, start_ray, validated_prompts
from promptmill.pipelines.batch.preflight import check_output_reachable, preflight
from promptmill.pipelines.batch.resume import finished_keys, missing
from promptmill.pipelines.batch.validate import ID, REASON
from promptmill.pipelines.metadata import metadata_files
from promptmill.pipelines.redaction import redact_text
from promptmill.pipelines.spec import JobSpec
from promptmill.pipelines.storage import full_url


def _keys(t: pa.Table, images_per_prompt: int) -> pa.Table:
    """(id, sample) of every sample of the accepted rows."""
    ids = t[ID].filter(pc.is_null(t[REASON]))
    n = len(ids)
    return pa.table({"id": ids.take(pa.array([i for i in range(n) for _ in range(images_per_prompt)], pa.int64())),
                     "sample": pa.array(list(range(images_per_prompt)) * n, pa.int32())})


def dry_run(spec: JobSpec, allow_subset: bool = False) -> dict[str, Any]:
    out = open_output(spec)
    plan, previous = preflight(spec, allow_subset, out)
    start_ray(spec)
    check_output_reachable(spec, ray.nodes())
    fs, root = out.fs, out.root
    verdicts = validated_prompts(plan, spec).select_columns([ID, REASON])
    finished = finished_keys(fs, [f for files in metadata_files(fs, root) for f in files]) if previous is not None else None
    if finished is not None:  # read once, then counted and joined per model
        verdicts, finished = verdicts.materialize(), finished.materialize()
    rejected = count_by(verdicts, REASON)
    accepted = rejected.pop(None, 0)
    models = {}
    for m in spec.models:
        images = accepted * m.images_per_prompt
        to_draw = images if finished is None else missing(
            verdicts.map_batches(_keys, fn_kwargs={"images_per_prompt": m.images_per_prompt}, batch_format="pyarrow"),
            finished, m.name, images).count()
        models[m.name] = {"family": m.family, "images": images, "in_output": images - to_draw, "to_draw": to_draw,
                          "candidates_per_image": m.candidates, **({"rerank_by": m.rerank_by} if m.rerank_by else {})}
    changes = input_changes(fs, root, plan) if previous is not None else {}
    return {"dry_run": True, "input_rows": plan.rows, "input_files": len(plan.files), "accepted": accepted,
            "rejected": rejected, "models": models, "output": redact_text(full_url(fs, root)),
            "output_state": "new" if previous is None else "resume", "written": "nothing",
            **({"input_changes": changes} if changes else {})}
