"""Preflight: everything that can fail on bad input is checked in the driver before anything is written.

Opens every input footer and every checkpoint, validates sampling, and refuses an output that already holds
a run with other settings; errors name the field and exit with code 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import pyarrow as pa
from promptmill.models import CheckpointError
from promptmill.models.local_cache import content_id
from promptmill.pipelines.batch.read import InputPlan, plan_input
from promptmill.pipelines.batch.sizing import scoring_on
from promptmill.pipelines.c2pa_signing import SigningError, check_signing
from promptmill.pipelines.layout import IMAGES, LEASE, METADATA, REJECTED, SHARDS, SPEC, STAGING
from promptmill.pipelines.redaction import redact, redact_text
from promptmill.pipelines.runs.tracking import TrackingError, check_trackers
from promptmill.pipelines.spec import JobSpec, ScoringSpec
from promptmill.pipelines.storage import Location, filesystem, full_url, is_local, join, read_json
from promptmill.pipelines.tables import InputError
from pydantic import ValidationError

log = logging.getLogger(__name__)

_RUN_DIRS = {IMAGES, METADATA, REJECTED, SHARDS, STAGING}


def _root_like(path: str, root: str) -> bool:
    """"", "/", "~", the working directory, a bucket root: places a run must never own."""
    if not path.strip() or not root.strip("/"):
        return True
    if is_local(path):
        return root.rstrip("/") in {os.path.expanduser("~").rstrip("/"), os.getcwd().rstrip("/")}
    return "/" not in root.strip("/")


class PreflightError(ValueError):
    """Bad spec, input or checkpoint found before any work; the CLI exits with code 2."""


def fingerprint(spec: JobSpec) -> dict:
    """What decides the pixels and scores of an existing sample; a rerun must not change it under the same
    output. Written (redacted) to `_spec.json` before the first image, so a crashed first run guards it too.
    Checkpoints count by content (`checkpoint_id`), not only by path: weights replaced in place are another model."""
    s = spec.scoring
    scorers = {k: getattr(s, k) for k in ("clip", "judge")}
    ids = {k: _content_id(v, s.storage_options) for k, v in scorers.items() if v and s.enabled}
    extra = {"aesthetic": s.aesthetic} if s.aesthetic else {}  # only when set: older outputs recorded none
    i = spec.input
    controls = {k: v for k, v in (("negative_prompt_column", i.negative_prompt_column), ("size_column", i.size_column))
                if v}  # which column decides a row's pixels; only when set, as above
    return redact({"seed": spec.seed, "image_format": spec.output.image_format, "format": spec.output.format,
                   **({"row_controls": controls} if controls else {}),
                   **({"c2pa": True} if spec.output.c2pa else {}),  # every image signed, or none: not which key
                   "scoring": {"enabled": s.enabled, **scorers, **{f"{k}_id": v for k, v in ids.items()}, **extra},
                   "models": {m.name: {"family": m.family, "checkpoint": m.checkpoint,
                                       "checkpoint_id": _model_id(m),
                                       **({"sizes": m.sizes} if m.sizes else {}),
                                       "sampling": m.pixel_sampling,
                                       **m.precision_record,
                                       **({"rerank_clip": s.clip} if m.candidates > 1 else {})}
                              for m in spec.models}})


def _model_id(m) -> str | None:
    """The checkpoint's content id, joined with each LoRA adapter's (and its weight) when there are any."""
    base = _content_id(m.checkpoint, m.storage_options)
    if not m.loras:
        return base
    parts = [base, *[(_content_id(x.path, m.storage_options), x.weight, x.weight_name) for x in m.loras]]
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=8).hexdigest()


def _content_id(url: str, storage_options: dict) -> str | None:
    """None where the checkpoint is not a path we can list (a plugin's own scheme): its path is then all we know."""
    try:
        return content_id(url, storage_options)
    except Exception as e:  # noqa: BLE001 - identification only: loading it is checked elsewhere, loudly
        log.warning("checkpoint %s: cannot list it to identify its content (%s); compared by path only",
                    redact_text(url), redact_text(f"{type(e).__name__}: {e}"))
        return None


def _known(old: dict, new: dict) -> dict:
    """`new` without the content ids an older `_spec.json` did not record (it predates them: nothing to compare)."""
    return {k: v for k, v in new.items() if not k.endswith("_id") or k in old}


def merged_fingerprint(spec: JobSpec, previous: dict | None) -> dict:
    """This run's fingerprint plus the models an earlier run wrote that this one leaves out (--allow-subset):
    their images stay in the output, so their settings stay guarded."""
    now = fingerprint(spec)
    for name, m in (previous or {}).get("models", {}).items():
        now["models"].setdefault(name, m)
    return now


def _check_fingerprint(spec: JobSpec, previous: dict, allow_subset: bool) -> None:
    now, where = fingerprint(spec), f"output.path {redact_text(spec.output.path)!r}"
    for k in ("seed", "image_format", "format", "scoring", "row_controls", "c2pa"):
        old = previous.get(k, "files" if k == "format" else None)
        if k in previous or k == "format" or (k in ("row_controls", "c2pa") and now.get(k)):
            if old != (_known(old, now[k]) if k == "scoring" and isinstance(old, dict) else now.get(k)):
                raise PreflightError(f"{where} already holds a run with {k} {old!r}; this spec has {now.get(k)!r}. "
                                     "Use a new output path")
    for name, m in now["models"].items():
        old = previous["models"].get(name)
        if old is not None and old != _known(old, m):
            raise PreflightError(f"{where} already holds model {name!r} with other settings ({old}); this spec has "
                                 f"{m}. Use a new output path")
    dropped = sorted(set(previous["models"]) - set(now["models"]))
    if dropped and not allow_subset:
        raise PreflightError(f"{where} already holds images of models {dropped} that this spec leaves out; use a new "
                             "output path, or --allow-subset to add to it with these models only")


_OURS = {SPEC, LEASE, f"{LEASE}.lock", STAGING}  # what may sit in an output before its first `_spec.json`


def check_output(spec: JobSpec, plan: InputPlan, allow_subset: bool = False, out: Location | None = None) -> dict | None:
    """The output is a path we may write into: not a root, not overlapping the input, empty or a promptmill run
    with the same settings. Returns the previous fingerprint (None for a new output). `out`: the output as the
    job opened it (else opened here)."""
    o = spec.output
    out = out or Location.open(o.path, o.storage_options)
    fs, root = out.fs, out.root
    where = f"output.path {redact_text(o.path)!r}"
    if _root_like(o.path, root):
        raise PreflightError(f"{where} is empty or a root (a filesystem, home, working directory or bucket root); "
                             "name a folder of its own, e.g. runs/my-job/ or s3://bucket/runs/my-job/")
    out_url = full_url(fs, root)
    in_fs, in_root = filesystem(spec.input.path, spec.input.storage_options)
    input_files = {full_url(plan.fs, f) for f in plan.files}
    in_url = full_url(in_fs, in_root.split("*")[0].rstrip("/"))
    in_dir = None if in_url in input_files else in_url  # a folder (or a glob's folder), not a single file
    if out_url == in_url or (in_dir and out_url.startswith(in_dir + "/")):
        raise PreflightError(f"{where} is inside input.path {redact_text(spec.input.path)!r}: a rerun would read its "
                             "metadata/ and rejected/ as prompts; put the output elsewhere")
    # the reverse: a prompts folder inside the output, or prompt files where the run writes (a single prompts
    # file at the output's top, as schedules keep it, is fine)
    if (in_dir and in_dir.startswith(out_url + "/")) or any(
            f.startswith(out_url + "/") and f[len(out_url) + 1:].split("/")[0] in _RUN_DIRS for f in input_files):
        raise PreflightError(f"input.path {redact_text(spec.input.path)!r} is inside {where}, where the run writes; "
                             "keep prompts outside the output (a single prompts file at its top is fine)")
    previous = read_json(fs, join(root, SPEC))
    if previous is None and fs.exists(root):
        foreign = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)
                         if p.rsplit("/", 1)[-1] not in _OURS and full_url(fs, p) not in input_files)
        if foreign:
            raise PreflightError(f"{where} holds files that are not a promptmill run ({foreign[:5]}); a run writes "
                                 "only into an empty folder or one of its own. Use a new output path")
    if previous is not None:
        _check_fingerprint(spec, previous, allow_subset)
    return previous


def preflight(spec: JobSpec, allow_subset: bool = False, out: Location | None = None) -> tuple[InputPlan, dict | None]:
    """Open the input, the metrics reference and the output; raise PreflightError naming the field. Returns the
    input plan and the output's previous fingerprint (None for a new output). Checkpoints, sampling and scorers are
    `check_models`'s (the job and its plan run it while Ray starts: `job.start_ray`)."""
    try:
        plan = plan_input(spec.input)
    except InputError as e:
        raise PreflightError(str(e)) from e
    try:
        check_trackers(spec.tracking)  # installed only: a tracker that is down costs its log, never the job
        if spec.output.c2pa is not None:
            check_signing(spec.output.c2pa, spec.output.image_format)
    except (TrackingError, SigningError) as e:
        raise PreflightError(str(e)) from e
    if spec.metrics.reference:
        from promptmill.pipelines.runs.reference import read_reference  # torchmetrics: ~1 s a job without metrics need not pay

        try:
            read_reference(spec.metrics.reference, spec.metrics.storage_options, spec.metrics.image_column, 4)
        except (OSError, ValueError, KeyError, pa.ArrowException) as e:
            raise PreflightError(f"metrics.reference: cannot read images from {spec.metrics.reference!r} ({e})") from e
    return plan, check_output(spec, plan, allow_subset, out)


def check_models(spec: JobSpec) -> None:
    """Every model's checkpoint, family and sampling, and the scorers; the first call in a driver imports torch
    (1.1 s on 2 cores), so the job makes it on a thread while Ray starts."""
    from promptmill.models import check_checkpoint, generator_class

    for i, m in enumerate(spec.models):
        where = f"models[{i}] ({m.name})"
        cls = generator_class(m.family)
        if hasattr(cls, "preflight"):  # a family that can check itself without loading weights in the driver
            try:
                cls.preflight(m.checkpoint, m.storage_options, m.family_sampling)
            except CheckpointError as e:
                raise PreflightError(f"{where}.checkpoint: {e}") from e
            except ValidationError as e:
                raise PreflightError(f"{where}.sampling: {e}") from e
            for j, lora in enumerate(m.loras):  # there, with a safetensors file: loading them is the actors'
                _check_lora(lora, m.storage_options, f"{where}.loras[{j}]")
            continue
        try:
            gen = check_checkpoint(m.checkpoint, m.storage_options, family=m.family)
        except CheckpointError as e:
            raise PreflightError(f"{where}.checkpoint: {e}") from e
        if gen.family != m.family:
            raise PreflightError(f"{where}.family: spec says {m.family!r}, checkpoint {m.checkpoint!r} is {gen.family!r}")
        try:
            gen.Sampling(**m.family_sampling)
        except ValidationError as e:
            raise PreflightError(f"{where}.sampling: {e}") from e
    if scoring_on(spec):
        check_scoring(spec.scoring)


def _check_lora(lora, storage_options: dict, where: str) -> None:
    try:
        fs, root = filesystem(lora.path, storage_options)
        files = [f.rsplit("/", 1)[-1] for f in fs.find(root)]
    except Exception as e:  # noqa: BLE001 - any storage error: this field's
        raise PreflightError(f"{where}.path: {redact_text(lora.path)!r} cannot be listed ({type(e).__name__}: {e})") from e
    weights = [f for f in files if f.endswith(".safetensors")]
    if not weights or (lora.weight_name and lora.weight_name not in weights):
        raise PreflightError(f"{where}.path: {redact_text(lora.path)!r} holds no {lora.weight_name or '.safetensors'} "
                             f"file (files: {sorted(files)[:10]})")


def check_scoring(scoring: ScoringSpec, where: str = "scoring.") -> None:
    """Load each scorer once in the driver: a bad checkpoint is an error naming its field before any work."""
    from promptmill.models.clip_loader import load_clip
    from promptmill.models.judge import load_judge

    for field_name, loader in (("clip", load_clip), ("judge", load_judge)):
        url = getattr(scoring, field_name)
        if url is None:
            continue
        try:
            loader(url, storage_options=scoring.storage_options)
        except (CheckpointError, OSError) as e:
            raise PreflightError(f"{where}{field_name}: {e}") from e
    if scoring.aesthetic:
        from promptmill.models.aesthetic import load_aesthetic

        try:
            load_aesthetic(scoring.aesthetic, scoring.storage_options)
        except (CheckpointError, OSError) as e:
            raise PreflightError(f"{where}aesthetic: {e}") from e


def check_output_reachable(spec: JobSpec, nodes: list[dict]) -> None:
    """A local output on a multi-node cluster would be written to each worker's own disk (write tasks run where
    the images are) while the driver commits only what its disk holds: data lost without a word. Refused unless
    the spec says the path is shared. A head with no CPUs counts as multi-node: its work runs on workers that
    an autoscaler adds later."""
    o = spec.output
    if not is_local(o.path) or o.shared:
        return
    alive = [n for n in nodes if n.get("Alive")]
    headless = any("node:__internal_head__" in n["Resources"] and not n["Resources"].get("CPU") for n in alive)
    if len(alive) > 1 or headless:
        where = f"{len(alive)} nodes" if len(alive) > 1 else "a head with no CPUs (work runs on worker nodes)"
        raise PreflightError(
            f"output.path {o.path!r} is a local path, but the Ray cluster has {where}: images and metadata would "
            "stay on the disks of the nodes that wrote them. Use an object-store URL (s3://..., gs://...), or set "
            "output.shared: true if every node mounts this path")
