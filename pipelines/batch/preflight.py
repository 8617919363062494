"""Preflight: everything that can fail on bad input is checked in the driver before anything is written.

Opens every input footer and every checkpoint, validates sampling, and refuses an output that already holds
a run with other settings; errors name the field and exit with code 2.
"""

from __future__ import annotations

import pyarrow as pa
from pydantic import ValidationError

from models import CheckpointError, load_generator
from models.clip import load_clip
from models.judge import load_judge
from pipelines.batch.commit import read_json
from pipelines.batch.read import InputPlan, plan_input
from pipelines.layout import SPEC
from pipelines.runs.evaluate import read_reference
from pipelines.spec import JobSpec
from pipelines.storage import filesystem, join
from pipelines.tables import InputError


class PreflightError(ValueError):
    """Bad spec, input or checkpoint found before any work; the CLI exits with code 2."""


def fingerprint(spec: JobSpec) -> dict:
    """What decides the pixels of an existing sample; a rerun must not change it under the same output."""
    return {"seed": spec.seed, "image_format": spec.output.image_format, "format": spec.output.format,
            "models": {m.name: {"family": m.family, "checkpoint": m.checkpoint, "sampling": m.sampling,
                                **({"rerank_clip": spec.scoring.clip} if m.candidates > 1 else {})}
                       for m in spec.models}}


def preflight(spec: JobSpec) -> InputPlan:
    """Open the input and every checkpoint, check sampling and output; raise PreflightError naming the field."""
    try:
        plan = plan_input(spec.input)
    except InputError as e:
        raise PreflightError(str(e)) from e
    for i, m in enumerate(spec.models):
        where = f"models[{i}] ({m.name})"
        try:
            gen = load_generator(m.checkpoint, "cpu", m.storage_options)
        except CheckpointError as e:
            raise PreflightError(f"{where}.checkpoint: {e}") from e
        if gen.family != m.family:
            raise PreflightError(f"{where}.family: spec says {m.family!r}, checkpoint {m.checkpoint!r} is {gen.family!r}")
        try:
            gen.Sampling(**m.family_sampling)
        except ValidationError as e:
            raise PreflightError(f"{where}.sampling: {e}") from e
    if scoring_on(spec):
        for field_name, loader in (("clip", load_clip), ("judge", load_judge)):
            url = getattr(spec.scoring, field_name)
            if url is None:
                continue
            try:
                loader(url, storage_options=spec.scoring.storage_options)
            except (CheckpointError, OSError) as e:
                raise PreflightError(f"scoring.{field_name}: {e}") from e
    if spec.metrics.reference:
        try:
            read_reference(spec.metrics.reference, spec.metrics.storage_options, spec.metrics.image_column, 4)
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            raise PreflightError(f"metrics.reference: cannot read images from {spec.metrics.reference!r} ({e})") from e
    fs, root = filesystem(spec.output.path, spec.output.storage_options)
    previous = read_json(fs, join(root, SPEC))
    if previous is not None:
        now = fingerprint(spec)
        for name, m in now["models"].items():
            old = previous["models"].get(name)
            same = all(previous.get(k, "files" if k == "format" else None) == now[k]
                       for k in ("seed", "image_format", "format"))
            if old is not None and old != m or not same:
                raise PreflightError(f"output.path {spec.output.path!r} already holds a run with different "
                                     f"seed/format/model {name!r} settings ({previous}); use a new output path")
    return plan


def scoring_on(spec: JobSpec) -> bool:
    return spec.scoring.enabled and bool(spec.scoring.clip or spec.scoring.judge)


def pools(spec: JobSpec) -> list:
    """Every actor pool's resources: each model's, plus the scoring pool."""
    return [m.resources for m in spec.models] + ([spec.scoring.resources] if scoring_on(spec) else [])


def pool_cpus(spec: JobSpec) -> float:
    """CPUs the actor pools hold at their minimum size."""
    return sum(r.actors * r.num_cpus for r in pools(spec))
