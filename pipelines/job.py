"""The generate job, wired: preflight -> read -> validate -> expand -> generate -> write -> commit.

Everything that can fail on bad input is checked in `preflight` before anything is written.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from pydantic import ValidationError
from ray.data import ActorPoolStrategy

from models import CheckpointError, load_generator
from models.clip import load_clip
from models.judge import load_judge
from pipelines.commit import SPEC, SUCCESS, SUMMARY, commit, done_keys, metadata_files, read_json, write_json
from pipelines.evaluate import evaluate_run, read_reference
from pipelines.expand import expand_batch
from pipelines.generate import GenerateStage
from pipelines.read import InputError, InputPlan, plan_input, read_prompts
from pipelines.report import write_report
from pipelines.results import Run, score_summary
from pipelines.score import ScoreStage
from pipelines.spec import JobSpec, SpecError, redact
from pipelines.storage import arrow_fs, filesystem, full_url, join
from pipelines.validate import ID, REASON, validate_batch
from pipelines.write import STAGING, WriteStage

log = logging.getLogger(__name__)


class PreflightError(ValueError):
    """Bad spec, input or checkpoint found before any work; the CLI exits with code 2."""


@dataclass
class JobResult:
    output: str
    input_rows: int
    accepted: int
    rejected: dict[str, int]
    images_written: dict[str, int]  # this run
    images_total: dict[str, int]  # in the committed metadata
    wall_s: float
    skipped: bool = False  # output was already complete
    summary: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return sum(self.images_written.values()) / self.wall_s if self.wall_s else 0.0

    def line(self) -> str:
        if self.skipped:
            return f"already complete: {sum(self.images_total.values())} images in {self.output}; nothing to do"
        return (f"{sum(self.images_written.values())} images ({sum(self.images_total.values())} in output), "
                f"{sum(self.rejected.values())} rejected, {self.images_per_s:.1f} images/s -> {self.output}")


def _fingerprint(spec: JobSpec) -> dict:
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
    if _scoring(spec):
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
        now = _fingerprint(spec)
        for name, m in now["models"].items():
            old = previous["models"].get(name)
            same = all(previous.get(k, "files" if k == "format" else None) == now[k]
                       for k in ("seed", "image_format", "format"))
            if old is not None and old != m or not same:
                raise PreflightError(f"output.path {spec.output.path!r} already holds a run with different "
                                     f"seed/format/model {name!r} settings ({previous}); use a new output path")
    return plan


def _scoring(spec: JobSpec) -> bool:
    return spec.scoring.enabled and bool(spec.scoring.clip or spec.scoring.judge)


def _pools(spec: JobSpec) -> list:
    """Every actor pool's resources: each model's, plus the scoring pool."""
    return [m.resources for m in spec.models] + ([spec.scoring.resources] if _scoring(spec) else [])


def _pool_cpus(spec: JobSpec) -> float:
    """CPUs the actor pools hold at their minimum size."""
    return sum(r.actors * r.num_cpus for r in _pools(spec))


def _ensure_ray(spec: JobSpec) -> None:
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # join the cluster RAY_ADDRESS names
        return
    # Embedded: every pool's minimum actors must fit beside the read/write tasks, or the job waits
    # forever for CPUs; logical CPUs may exceed cores (actors idle while others work).
    needed = _pool_cpus(spec) + 2
    num_cpus = max(os.cpu_count() or 1, int(needed + 0.999))
    # address="local": always a fresh embedded Ray; without it ray.init() joins whatever cluster the last
    # `ray start` on this machine recorded in /tmp/ray (a stale record made jobs hang on a dead GCS)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False)
    log.info("started an embedded Ray with %d logical CPUs", num_cpus)


def _check_capacity(spec: JobSpec) -> None:
    """Pools whose minimum actors take every CPU starve the read/write tasks: the job would hang, not fail."""
    have = ray.cluster_resources()
    need_cpu = _pool_cpus(spec) + 1
    if have.get("CPU", 0) < need_cpu:
        raise PreflightError(
            f"models[*].resources: the actor pools need {need_cpu:g} CPUs at minimum (actors x num_cpus, plus 1 "
            f"for reading and writing) but the Ray cluster has {have.get('CPU', 0):g}; lower actors or num_cpus "
            "(scoring.resources counts too)")
    need_gpu = sum(r.actors * r.num_gpus for r in _pools(spec))
    if need_gpu > have.get("GPU", 0):
        log.warning("actor pools ask for %g GPUs, the cluster has %g now: waiting for the autoscaler",
                    need_gpu, have.get("GPU", 0))


def _write_rejected(spec: JobSpec, plan: InputPlan, validated: ray.data.Dataset, root_url: str) -> dict[str, int]:
    """Rejected rows (original columns + reason) -> _staging/rejected; returns counts by reason."""
    fs, root = filesystem(root_url, spec.output.storage_options)
    staging = join(root, STAGING, "rejected")
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    keep = [c for c in plan.columns if c != "row_hash"]
    reason_col = "reason" if "reason" not in keep else "promptmill_reason"

    def to_rejected(t: pa.Table) -> pa.Table:
        t = t.filter(pc.invert(pc.is_null(t[REASON])))
        out = t.select(keep).append_column(reason_col, t[REASON])
        return out if spec.input.id_column else out.append_column("row_id", t[ID])

    rejected = validated.map_batches(to_rejected, batch_format="pyarrow")
    try:
        rejected.write_parquet(staging, filesystem=arrow_fs(fs), min_rows_per_file=10_000)
    except FileNotFoundError:  # Ray removes the empty output dir of a 0-row write; on s3fs that dir never existed
        if fs.exists(staging) and fs.find(staging):
            raise
    counts: dict[str, int] = {}
    for f in (fs.find(staging) if fs.exists(staging) else []):
        if f.endswith(".parquet"):
            with fs.open(f, "rb") as fh:
                for r in pq.read_table(fh, columns=[reason_col]).column(0).to_pylist():
                    counts[r] = counts.get(r, 0) + 1
    return counts


def run_job(spec: JobSpec) -> JobResult:
    t0 = time.time()
    # 1. Check inputs: spec, input files, checkpoints, sampling, output compatibility
    plan = preflight(spec)
    fs, root = filesystem(spec.output.path, spec.output.storage_options)
    out_url = full_url(fs, root)
    _ensure_ray(spec)
    _check_capacity(spec)

    # 2. Read and validate (bad rows are kept, marked with a reason)
    dup = plan.duplicate_ids
    validated = read_prompts(plan, spec.input).map_batches(
        functools.partial(validate_batch, spec=spec.input, duplicates=dup), batch_format="pyarrow",
    ).materialize()  # read + validate once: the rejected write and every model branch reuse it (prompt
    # rows are small; images are what streams)
    done = done_keys(fs, root)

    # 3. Rejected table (staged; committed below)
    rejected = _write_rejected(spec, plan, validated, out_url)
    accepted = plan.rows - sum(rejected.values())

    # 4. One branch per model: expand -> generate (actor pool); then score, write images + metadata parts
    branches = []
    for m in spec.models:
        r = m.resources
        samples = validated.map_batches(
            functools.partial(expand_batch, prompt_column=spec.input.prompt_column, model=m.name,
                              images_per_prompt=m.images_per_prompt, job_seed=spec.seed, done=done),
            batch_format="pyarrow",
        ).repartition(target_num_rows_per_block=r.batch_size)  # one block per generate call: every actor
        # gets work (a small prompt file is one block) and a crash loses at most the blocks in flight
        branches.append(samples.map_batches(
            GenerateStage, fn_constructor_kwargs={"model": m, "scoring": spec.scoring},
            compute=ActorPoolStrategy(min_size=r.actors, max_size=r.max_actors),
            num_gpus=r.num_gpus, num_cpus=r.num_cpus, batch_size=r.batch_size))
    images = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
    s = spec.scoring.resources
    if _scoring(spec):  # 5. one scoring pool for every model's images
        images = images.map_batches(ScoreStage, fn_constructor_kwargs={"scoring": spec.scoring},
                                    compute=ActorPoolStrategy(min_size=s.actors, max_size=s.max_actors),
                                    num_gpus=s.num_gpus, num_cpus=s.num_cpus, batch_size=s.batch_size)
    o = spec.output
    stream = images.map_batches(WriteStage(out_url, o.storage_options, o.image_format, o.format),
                                batch_size=None if o.format == "files" else o.shard_size, num_cpus=0.5)
    written: dict[str, int] = {m.name: 0 for m in spec.models}
    for batch in stream.iter_batches(batch_size=None, batch_format="numpy"):
        for name, n in zip(batch["model"], batch["images"]):
            written[str(name)] += int(n)

    # 6. Commit: exactly one metadata row per sample, then rejected, summary, _SUCCESS (last)
    success = join(root, SUCCESS)
    rejected_staging = join(root, STAGING, "rejected")
    if sum(written.values()) == 0 and fs.exists(success) and not metadata_files(fs, root)[1]:
        if fs.exists(join(root, STAGING)):  # holds only this run's rejected copy
            fs.rm(join(root, STAGING), recursive=True)
        summary = read_json(fs, join(root, SUMMARY)) or {}
        return JobResult(out_url, plan.rows, accepted, rejected, written, summary.get("images_total", {}),
                         time.time() - t0, skipped=True, summary=summary)
    if fs.exists(success):
        fs.rm(success)
    write_json(fs, join(root, SPEC), _fingerprint(spec))
    table = commit(fs, root)
    rejected_final = join(root, "rejected")
    if fs.exists(rejected_final):
        fs.rm(rejected_final, recursive=True)
    staged = fs.find(rejected_staging) if fs.exists(rejected_staging) else []
    if staged:
        fs.makedirs(rejected_final, exist_ok=True)
    for f in staged:  # file by file: s3fs' recursive mv trips over the (non-existent) directory key
        fs.mv(f, join(rejected_final, f[len(rejected_staging):]))
    totals = {str(k): int(v) for k, v in zip(*pc.value_counts(table["model"]).flatten())} if len(table) else {}
    wall = time.time() - t0
    result = JobResult(out_url, plan.rows, accepted, rejected, written, totals, wall)
    result.summary = {
        "name": spec.name, "output": out_url, "input_rows": plan.rows, "accepted": accepted,
        "rejected": rejected, "rejected_total": sum(rejected.values()),
        "images_written_this_run": written, "images_total": totals, "wall_s": round(wall, 3),
        "images_per_s": round(result.images_per_s, 3), "spec": redact(spec.model_dump(mode="json")),
    }
    result.summary["scores"] = score_summary(table)
    write_json(fs, join(root, SUMMARY), result.summary)
    # 7. Job-level metrics and the report, from the table just committed (not read back again)
    if spec.metrics.reference or spec.output.report:
        run = Run(out_url, spec.output.storage_options, metadata=table, summary=result.summary)
        if spec.metrics.reference:
            m = spec.metrics
            evaluate_run(run, m.reference, spec.scoring.judge, max_images=m.max_images,
                         reference_storage_options=m.storage_options, image_column=m.image_column,
                         judge_storage_options=spec.scoring.storage_options)
            result.summary = run.summary
        if spec.output.report:
            write_report(run)
    fs.pipe(success, b"")
    if fs.exists(join(root, STAGING)):
        fs.rm(join(root, STAGING), recursive=True)
    return result


__all__ = ["JobResult", "PreflightError", "SpecError", "preflight", "run_job"]
