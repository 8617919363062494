"""`promptmill generate --dry-run`: what a run would do, with nothing written.

The same preflight and validation as the run (so a bad spec, input or checkpoint fails the same way), then the
counts a user checks before paying for GPUs: rows, rejected by reason, images per model, and how many of those
the output already holds (a rerun draws only the rest).
"""

from __future__ import annotations

from typing import Any

import pyarrow.compute as pc
import ray
from promptmill.pipelines.batch.commit import done_keys
from promptmill.pipelines.batch.job import open_output, start_ray, validated_prompts
from promptmill.pipelines.batch.preflight import check_output_reachable, preflight
from promptmill.pipelines.batch.validate import ID, REASON
from promptmill.pipelines.layout import sample_key
from promptmill.pipelines.redaction import redact_text
from promptmill.pipelines.spec import JobSpec
from promptmill.pipelines.storage import full_url


def dry_run(spec: JobSpec, allow_subset: bool = False) -> dict[str, Any]:
    out = open_output(spec)
    plan, previous = preflight(spec, allow_subset, out)
    start_ray(spec)
    check_output_reachable(spec, ray.nodes())
    validated = validated_prompts(plan, spec)
    rejected: dict[str, int] = {}
    accepted: list[str] = []
    for t in validated.iter_batches(batch_format="pyarrow", batch_size=None):
        for reason in t.column(REASON).filter(pc.is_valid(t.column(REASON))).to_pylist():
            rejected[reason] = rejected.get(reason, 0) + 1
        accepted += t.column(ID).filter(pc.is_null(t.column(REASON))).to_pylist()
    fs, root = out.fs, out.root
    done = done_keys(fs, root) if previous is not None else frozenset()
    models = {}
    for m in spec.models:
        keys = [sample_key(i, m.name, k) for i in accepted for k in range(m.images_per_prompt)]
        have = sum(k in done for k in keys)
        models[m.name] = {"family": m.family, "images": len(keys), "in_output": have, "to_draw": len(keys) - have,
                          "candidates_per_image": m.candidates}
    return {"dry_run": True, "input_rows": plan.rows, "input_files": len(plan.files), "accepted": len(accepted),
            "rejected": rejected, "models": models, "output": redact_text(full_url(fs, root)),
            "output_state": "new" if previous is None else "resume", "written": "nothing"}
