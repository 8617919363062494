"""The generate job, wired: each numbered step of `run_job` is one call (like a diffusers `__call__`).

preflight -> read -> validate -> rejected -> expand -> generate -> score -> write -> finalize.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from promptmill.pipelines.batch.chain import GenerateStageActor, ScoreStageActor
from promptmill.pipelines.batch.duplicates import duplicated, validate_with
from promptmill.pipelines.batch.expand import expand_batch
from promptmill.pipelines.batch.finalize import JobResult, finalize
from promptmill.pipelines.batch.inputs import input_changes
from promptmill.pipelines.batch.lease import Lease, LeaseHeld
from promptmill.pipelines.batch.pools import MAX_TASK_RETRIES, map_in_pool
from promptmill.pipelines.batch.preflight import (
    PreflightError,
    check_models,
    check_output_reachable,
    merged_fingerprint,
    preflight,
)
from promptmill.pipelines.batch.progress import Progress
from promptmill.pipelines.batch.read import InputPlan, read_ids, read_prompts, used_columns
from promptmill.pipelines.batch.resume import finished_keys, finished_per_model, missing
from promptmill.pipelines.batch.sizing import JobPlan, make_plan, pool_cpus, pools, scoring_in_pool
from promptmill.pipelines.batch.validate import ID, REASON, id_texts, validate_batch
from promptmill.pipelines.batch.write import WriteStage
from promptmill.pipelines.layout import REJECTED, SPEC, STAGING
from promptmill.pipelines.metadata import metadata_files
from promptmill.pipelines.ray_cluster import ensure_ray, local_cores
from promptmill.pipelines.redaction import redact_text
from promptmill.pipelines.retry import STORAGE_LINE, RetryPolicy, StorageError, use_policy
from promptmill.pipelines.spec import JobSpec, OutputSpec, SpecError
from promptmill.pipelines.storage import Location, arrow_fs, join, write_json

log = logging.getLogger(__name__)


def _check_capacity(spec: JobSpec, in_pool: bool) -> None:
    """Pools whose minimum actors take every CPU starve the read/write tasks: the job would hang, not fail."""
    have = ray.cluster_resources()
    need_cpu = pool_cpus(spec, in_pool) + 1
    if have.get("CPU", 0) < need_cpu:
        raise PreflightError(
            f"models[*].resources: the actor pools need {need_cpu:g} CPUs at minimum (actors x num_cpus, plus 1 "
            f"for reading and writing) but the Ray cluster has {have.get('CPU', 0):g}; lower actors or num_cpus "
            "(scoring.resources counts with scoring.pool: true)")
    need_gpu = sum(r.actors * r.num_gpus for r in pools(spec, in_pool))
    if need_gpu > have.get("GPU", 0):
        log.warning("actor pools ask for %g GPUs, the cluster has %g now: waiting for the autoscaler",
                    need_gpu, have.get("GPU", 0))


def open_output(spec: JobSpec) -> Location:
    """The job's storage.retry made this process's policy (every filesystem opened from now on keeps it, also on the
    Ray workers it is sent to), then the output opened once: the run and its dry run start the same way."""
    use_policy(RetryPolicy(spec.storage.retry.attempts, spec.storage.retry.max_wait_s))
    return Location.open(spec.output.path, spec.output.storage_options)


def find_duplicates(plan: InputPlan) -> ray.data.MaterializedDataset | None:
    """The duplicated ids of the rows the run reads, on Ray Data (none to find when ids are derived)."""
    return None if plan.id_column is None else duplicated(read_ids(plan), plan.rows).materialize()


def validated_prompts(plan: InputPlan, spec: JobSpec, duplicates: ray.data.MaterializedDataset | None = None,
                      every_column: bool = False) -> ray.data.Dataset:
    """Every input row with its id and reason (null = accepted); the run and --dry-run read the input this way.
    Columns: those a sample uses (`read.used_columns`), or every original one (the rejected table keeps them).
    `duplicates`: `find_duplicates(plan)`, found here when not given."""
    presets = frozenset.intersection(*(frozenset(m.sizes) for m in spec.models))  # names every model can draw
    validate = functools.partial(validate_batch, spec=spec.input, presets=presets)
    rows = read_prompts(plan, spec.input, None if every_column else used_columns(spec.input))
    if plan.id_column is None:
        return rows.map_batches(validate, fn_kwargs={"duplicates": frozenset()}, batch_format="pyarrow")
    column = plan.id_column
    return validate_with(rows, duplicates if duplicates is not None else find_duplicates(plan), validate,
                         lambda t: pa.array(id_texts(t.column(column)), pa.string()), plan.rows)


def _write_rejected(spec: JobSpec, plan: InputPlan, validated: ray.data.Dataset, out: Location) -> dict[str, int]:
    """Rejected rows (original columns + reason) -> _staging/rejected; returns counts by reason."""
    fs = out.fs
    staging = out.path(STAGING, REJECTED)
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


def _writer(spec: JobSpec, out: Location, token: str = "") -> WriteStage:
    o = spec.output
    return WriteStage(out, o.image_format, o.format, o.provenance, tuple(spec.input.keep_columns), o.sidecars, token,
                      o.c2pa)


def carried(spec: JobSpec) -> tuple[str, ...]:
    """Input columns each sample carries to the generator and writer: input.keep_columns and the per-row controls."""
    i = spec.input
    return tuple(dict.fromkeys([*i.keep_columns, *(c for c in (i.negative_prompt_column, i.size_column) if c)]))


def _images(spec: JobSpec, validated: ray.data.Dataset, finished: ray.data.Dataset | frozenset | None, record: dict,
            plan: JobPlan, write: WriteStage | None = None, accepted: int = 0) -> ray.data.Dataset:
    """One branch per model (expand, less what `finished` holds -> its generator pool, which also scores when
    `plan.scoring` is "fused"), unioned, then the scoring pool if there is one. `finished`: the output's finished
    keys (`resume.finished_keys`; None or an empty set: nothing done); `accepted`: accepted rows, to size the join.
    `write`: the last actor stage writes what it made (pixels then never cross the object store to a write task)."""
    finished = finished if isinstance(finished, ray.data.Dataset) else None
    from promptmill.pipelines.batch.generate import GenerateStage  # torch: imported by the actors, and by the driver only
    from promptmill.pipelines.batch.score import ScoreStage  # here, once `check_models` has (run_job)

    last = [write] if write is not None else []
    branches = []
    for m in spec.models:
        r, size = m.resources, plan.models[m.name]
        if size.max_actors > r.max_actors:
            log.info("%s: up to %d single-threaded actors on this machine's cores", m.name, size.max_actors)
        samples = validated.map_batches(
            functools.partial(expand_batch, prompt_column=spec.input.prompt_column, model=m.name,
                              images_per_prompt=m.images_per_prompt, job_seed=spec.seed, keep=carried(spec)),
            batch_format="pyarrow",
        )
        samples = missing(samples, finished, m.name, accepted * m.images_per_prompt).repartition(
            target_num_rows_per_block=r.batch_size)  # one block per generate call: every actor
        # gets work (a small prompt file is one block) and a crash loses at most the blocks in flight
        draw = (GenerateStage, {"model": m, "scoring": spec.scoring,
                                "checkpoint_id": record["models"][m.name]["checkpoint_id"],
                                "checkpoint_label": redact_text(m.checkpoint),
                                "nsfw": spec.output.nsfw, "truncate": spec.input.truncate,
                                "negative_column": spec.input.negative_prompt_column,
                                "size_column": spec.input.size_column, "threads": size.threads})
        score = [(ScoreStage, {"scoring": spec.scoring, "num_gpus": r.num_gpus})] if plan.scoring == "fused" else []
        after = last if plan.scoring != "pool" else []
        branches.append(map_in_pool(samples, GenerateStageActor, {"on_device": [draw, *score], "after": after}, size))
    images = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
    if plan.scoring != "pool":
        return images
    score = (ScoreStage, {"scoring": spec.scoring, "threads": plan.scorers.threads})
    return map_in_pool(images, ScoreStageActor, {"on_device": [score], "after": last}, plan.scorers)


def _write(spec: JobSpec, images: ray.data.Dataset, write: WriteStage | None, expected: int,
           progress: Progress) -> tuple[dict[str, int], dict[str, int], str]:
    """Images first, then each batch's metadata part; returns images written per model, the rows the generators
    gave no image to keep, by reason, and Ray Data's stats of the run. More errors (`write.ERROR_REASONS`) than
    `output.max_error_fraction` of the job's `expected` images fails it."""
    o = spec.output
    stream = images if write is None else write_tasks(images, write, o)
    written: dict[str, int] = {m.name: 0 for m in spec.models}
    errors, first, reasons = 0, None, {}
    try:
        for batch in stream.iter_batches(batch_size=None, batch_format="numpy"):
            for name, n, bad, text, by_reason in zip(batch["model"], batch["images"], batch["errors"],
                                                     batch["first_error"], batch["rejected"]):
                written[str(name)] += int(n)
                errors += int(bad)
                first = first or (f"{name}: {text}" if bad else None)
                for r, k in json.loads(by_reason).items():
                    reasons[r] = reasons.get(r, 0) + k
                progress.update(int(n), sum(json.loads(by_reason).values()))
    except ray.exceptions.RayError as e:
        raise JobFailed.from_ray(e) from e
    if errors and errors > o.max_error_fraction * expected:
        raise JobFailed(f"{errors} of {expected} images failed to generate (more than output.max_error_fraction = "
                        f"{o.max_error_fraction:g}); first: {first}; they are in rejected/ after a successful run; "
                        "staged work is kept, run the same command again to resume")
    return written, reasons, _stats(stream)


def write_tasks(images: ray.data.Dataset, write: WriteStage, o: OutputSpec) -> ray.data.Dataset:
    """What the actors did not write already (`_images`), in write tasks: one per generated batch for files,
    `shard_size` rows for a WebDataset tar or a Parquet part. Bounded retries, as for the pools: Ray Data retries
    its tasks without limit, so a write whose worker dies every time (an OOM on a large shard) hung the job."""
    rows = None if o.format == "files" else o.shard_size
    return images.map_batches(write, batch_size=rows, num_cpus=0.5, max_retries=MAX_TASK_RETRIES)


class JobFailed(RuntimeError):
    """The job stopped part-way (staged work is kept: the same command resumes); one line for the CLI."""

    @classmethod
    def from_ray(cls, e: Exception) -> JobFailed | StorageError:
        text = str(e)
        storage = STORAGE_LINE.search(text)
        if storage:  # a stage gave up on storage: its one line, not Ray's wrapping
            return StorageError(f"{storage[0]}; staged work is kept, run the same command again to resume")
        stage = next((s for s in ("GenerateStage", "ScoreStage", "WriteStage") if s in text), "a stage")
        first = next((ln.strip() for ln in text.splitlines() if "Error" in ln or "died" in ln), text.splitlines()[0])
        verb = {"GenerateStage": "generate", "ScoreStage": "score", "WriteStage": "write"}.get(stage, stage)
        return cls(f"{verb} failed ({type(e).__name__}: {first[:300]}); staged work is kept, "
                   "run the same command again to resume")


def start_ray(spec: JobSpec) -> None:
    """Join or start the Ray the job runs on while `check_models` checks its checkpoints and scorers: the check
    imports torch, 1.1 s of one core, while ray.init mostly waits on the processes it starts
    (benchmarks/startup.py). Either one's error is raised once both have ended; nothing is written before."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="promptmill-preflight") as pool:
        models_checked = pool.submit(_check_models_beside_ray, spec)
        ensure_ray(pool_cpus(spec) + 2)
        models_checked.result()


def _check_models_beside_ray(spec: JobSpec) -> None:
    """`check_models` at a lower CPU priority (Linux nice is per thread): the processes ray.init starts get the
    cores first, so the raylet registers sooner, and the import soaks up what they leave (docs/benchmarks.md,
    "Sizing rules")."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    check_models(spec)


PHASES = ("preflight", "ray", "read_validate_rejected", "first_image", "images", "commit")  # in run_job's order


class Phases(dict):
    """Seconds per step of the run (summary.json `phases_s`): where a job's fixed cost goes."""

    def __init__(self) -> None:
        super().__init__()
        self.last = time.monotonic()

    def mark(self, name: str, at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        self[name] = round(at - self.last, 3)
        self.last = at


def run_job(spec: JobSpec, allow_subset: bool = False) -> JobResult:
    t0, phases = time.time(), Phases()
    out = open_output(spec)
    fs, root = out.fs, out.root
    # 1. Check inputs: spec, input files, checkpoints, sampling, output (ours, same settings), capacity
    plan, previous = preflight(spec, allow_subset, out)
    phases.mark("preflight")
    start_ray(spec)  # checkpoints and scorers are checked while Ray starts
    in_pool = scoring_in_pool(spec, ray.cluster_resources().get("CPU", 0))  # decided once, for this Ray
    _check_capacity(spec, in_pool)
    check_output_reachable(spec, ray.nodes())
    phases.mark("ray")
    # 2. One writer per output; its settings are on record before the first image
    try:
        lease = Lease(fs, root, spec.output.lease_ttl_s, job=_ray_job_id()).acquire(spec.output.lease_wait_s)
    except LeaseHeld as e:
        raise PreflightError(f"output.path: {e}; two runs must not write one output at once") from e
    with lease:
        changes = input_changes(fs, root, plan)  # warned now; in summary.json at the end
        record = merged_fingerprint(spec, previous)
        if record != previous:  # a rerun of a complete output touches nothing
            write_json(fs, join(root, SPEC), record)
        # 3. Read and validate once (bad rows are kept, marked with a reason): the rejected write and every
        #    model branch reuse it (prompt rows are small; images are what streams)
        duplicates = find_duplicates(plan)
        validated = validated_prompts(plan, spec, duplicates).materialize()
        # 4. Rejected rows -> staging (published by finalize), with every original column: read again only when
        #    the input has columns no sample uses
        unused = set(plan.columns) - set(used_columns(spec.input)) - {"row_hash"}
        rejected = _write_rejected(spec, plan, validated_prompts(plan, spec, duplicates, every_column=True)
                                   if unused else validated, out)
        phases.mark("read_validate_rejected")
        # 5. Generate, score and write what is missing
        accepted = plan.rows - sum(rejected.values())
        expected = accepted * sum(m.images_per_prompt for m in spec.models)
        committed, staged = metadata_files(fs, root)  # listed once: what is done, and the parts this run adopts
        fence = lease.fence(staged)
        finished = finished_keys(fs, committed + staged)
        finished = finished.materialize() if finished is not None else None  # counted, then joined per model
        done = finished_per_model(finished)
        todo = {m.name: max(0, accepted * m.images_per_prompt - done.get(m.name, 0)) for m in spec.models}
        progress = Progress(sum(todo.values()), sum(rejected.values()))  # not expected - done: with
        # --allow-subset, done also holds the left-out models' samples
        layout = make_plan(spec, in_pool, local_cores(), todo)  # where everything runs, and each pool's size
        log.info("plan: %s", layout)
        # files: the last actor stage writes (output.write_in); WebDataset tars and Parquet parts gather rows in tasks
        write = _writer(spec, out, lease.token)
        images = _images(spec, validated, finished, record, layout, write if layout.write_in_actors else None,
                         accepted)
        written, dropped, stats = _write(spec, images, None if layout.write_in_actors else write, expected, progress)
        progress.final()
        if progress.first is not None:
            phases.mark("first_image", progress.first)  # actors start, load their models, draw the first batch
        phases.mark("images")
        rejected = {**rejected, **dropped}
        # 6. Commit exactly once, rejected rows, summary, metrics, report, _SUCCESS last
        return finalize(spec, fs, root, input_rows=plan.rows, rejected=rejected, written=written, started=t0,
                        stats=stats, phases=phases, fence=fence, plan=plan, input_changes=changes)


def _stats(ds: ray.data.Dataset) -> str:
    """Ray Data's per-operator stats of the run (time, rows, bytes per operator), for summary.json."""
    try:
        return ds.stats()
    except Exception as e:  # noqa: BLE001 - diagnostics only; never fail a finished job over them
        return f"unavailable: {e}"


def _ray_job_id() -> str:
    try:
        return ray.get_runtime_context().get_job_id()
    except Exception:  # noqa: BLE001 - provenance only
        return ""


__all__ = ["JobFailed", "JobResult", "PreflightError", "SpecError", "StorageError", "preflight", "run_job"]
