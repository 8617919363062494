"""Finishing a run, as one function: commit, rejected rows, summary, metrics, report, trackers, `_SUCCESS` last.

`_SUCCESS` doubles as the "done" marker (img2dataset writes its stats last for the same reason): a rerun on
an output that has it and nothing new to write touches nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow.compute as pc
from fsspec import AbstractFileSystem
from promptmill.pipelines.batch.commit import commit
from promptmill.pipelines.batch.imagefolder import write_imagefolders
from promptmill.pipelines.batch.inputs import record
from promptmill.pipelines.batch.isolate import error_text
from promptmill.pipelines.batch.lease import Fence
from promptmill.pipelines.batch.read import InputPlan
from promptmill.pipelines.layout import OWN_REJECTED, PATHS, REJECTED, STAGING, SUCCESS, SUMMARY, rejected_name
from promptmill.pipelines.metadata import metadata_files
from promptmill.pipelines.redaction import redact
from promptmill.pipelines.runs.report import write_report
from promptmill.pipelines.runs.results import Run, score_summary
from promptmill.pipelines.runs.tracking import configured, log_run
from promptmill.pipelines.spec import JobSpec
from promptmill.pipelines.storage import full_url, join, read_json, write_json

log = logging.getLogger(__name__)


def pause_point(step: str) -> None:
    """Fault-injection seam for tests: `PROMPTMILL_PAUSE_AT=<step>:<seconds>` holds the run there (with its lease
    and its staged work), so a test can start a second writer or kill this one at a known step."""
    at = os.environ.get("PROMPTMILL_PAUSE_AT", "")
    if at.startswith(f"{step}:"):
        log.warning("PROMPTMILL_PAUSE_AT: pausing before %s for %s s", step, at.split(":", 1)[1])
        time.sleep(float(at.split(":", 1)[1]))


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


def _publish_rejected(fs: AbstractFileSystem, root: str, previous: list[str]) -> list[str]:
    """This run's staged rejected table replaces the one the last run published (every run re-validates all
    input rows). Deletes only the files the last summary lists as its own; returns the names published."""
    staging, final = join(root, STAGING, REJECTED), join(root, REJECTED)
    for name in previous:
        if not isinstance(name, str) or OWN_REJECTED.fullmatch(name) is None:  # summary.json is anyone's to edit
            log.warning("summary.json lists %r among the rejected files, which is not one of ours: left alone", name)
        elif fs.exists(join(final, name)):
            fs.rm(join(final, name))
    staged = sorted(f for f in (fs.find(staging) if fs.exists(staging) else []) if f.endswith(".parquet"))
    if staged:
        fs.makedirs(final, exist_ok=True)
    names = [rejected_name(i) for i in range(len(staged))]
    for f, name in zip(staged, names):  # file by file: s3fs' recursive mv trips over the (non-existent) directory key
        fs.mv(f, join(final, name))
    return names


def _after_commit(fs: AbstractFileSystem, root: str, run: Run, key: str, step: Callable[[], object]) -> None:
    """Run a step that reads the committed run; its failure is recorded under `key` in summary.json, not raised."""
    try:
        step()
    except Exception as e:  # noqa: BLE001 - the data is committed; this part is rebuilt by its own command
        log.exception("%s failed after the data was committed", key.removesuffix("_error"))
        run.summary[key] = error_text(e)
        write_json(fs, join(root, SUMMARY), run.summary)


def _track(spec: JobSpec, fs: AbstractFileSystem, root: str, run: Run) -> None:
    """Log the run to its trackers; their ids, or `tracking_error` naming each that failed, go into summary.json."""
    errors = log_run(spec, run)
    if errors:
        run.summary["tracking_error"] = "; ".join(f"tracking.{k}: {v}" for k, v in errors.items())
    if errors or "tracking" in run.summary:
        write_json(fs, join(root, SUMMARY), run.summary)


def near_duplicate_space(spec: JobSpec) -> tuple[str, float | None]:
    """(feature column, threshold) of diversity and near-duplicates: the judge's with its calibrated threshold
    (None without a calibration), else the CLIP's image embeddings with `scoring.clip_near_duplicate_distance`."""
    s = spec.scoring
    if s.enabled and s.judge:
        from promptmill.models.judge import load_judge

        judge = load_judge(s.judge, storage_options=s.storage_options)
        return "judge_features", judge.calibration.get("near_duplicate_distance")
    return "clip_features", (s.clip_near_duplicate_distance if s.enabled and s.clip else None)


def finalize(spec: JobSpec, fs: AbstractFileSystem, root: str, *, input_rows: int, rejected: dict[str, int],
             written: dict[str, int], started: float, stats: str | None = None,
             phases: dict[str, float] | None = None, fence: Fence | None = None, plan: InputPlan | None = None,
             input_changes: dict[str, list[str]] | None = None) -> JobResult:
    """Finish a run: exactly one metadata row per sample, then rejected rows, summary, metrics, report, the input
    manifest (`plan`'s files) and `_SUCCESS` (last, so it doubles as the "done" marker). A rerun on a complete
    output changes nothing but summary.json's `input_changes`, when input files changed or went."""
    out_url = full_url(fs, root)
    accepted = input_rows - sum(rejected.values())
    success = join(root, SUCCESS)
    # 1. Nothing new and already complete: leave the output as it is
    if sum(written.values()) == 0 and fs.exists(success) and not metadata_files(fs, root)[1]:
        if fs.exists(join(root, STAGING)):  # holds only this run's rejected copy
            fs.rm(join(root, STAGING), recursive=True)
        summary = read_json(fs, join(root, SUMMARY)) or {}
        if input_changes and summary.get("input_changes") != input_changes:
            summary["input_changes"] = input_changes
            write_json(fs, join(root, SUMMARY), summary)
        return JobResult(out_url, input_rows, accepted, rejected, written, summary.get("images_total", {}),
                         time.time() - started, skipped=True, summary=summary)
    # 2. Merge staging into metadata/, move the rejected rows
    pause_point("commit")
    if fence is not None:
        fence.guard()  # a run that stalled here past its lease stops before it touches anything committed (the
        # commit then renews it synchronously before merging)
    if fs.exists(success):
        fs.rm(success)
    table = commit(fs, root, near_duplicate_space(spec), fence)
    if spec.output.format == "files":  # `datasets`' imagefolder table beside each model's images
        if fence is not None:
            fence.guard()
        write_imagefolders(fs, root)
    previous = read_json(fs, join(root, SUMMARY)) or {}
    if "rejected_files" in previous or not fs.exists(join(root, REJECTED)):
        mine = previous.get("rejected_files", [])
    else:  # a summary from before the list was kept: its rejected/ files are that run's
        mine = [f.rsplit("/", 1)[-1] for f in fs.find(join(root, REJECTED)) if OWN_REJECTED.fullmatch(f.rsplit("/", 1)[-1])]
    if fence is not None:
        fence.guard()
    rejected_files = _publish_rejected(fs, root, mine)
    # 3. Summary, from the table just committed (not read back again)
    totals = {str(k): int(v) for k, v in zip(*pc.value_counts(table["model"]).flatten())} if len(table) else {}
    wall = time.time() - started
    result = JobResult(out_url, input_rows, accepted, rejected, written, totals, wall)
    result.summary = {
        "name": spec.name, "output": out_url, "input_rows": input_rows, "accepted": accepted,
        "rejected": rejected, "rejected_total": sum(rejected.values()),
        "images_written_this_run": written, "images_total": totals, "wall_s": round(wall, 3),
        "images_per_s": round(result.images_per_s, 3), "spec": redact(spec.model_dump(mode="json")),
        "scores": score_summary(table), "rejected_files": rejected_files, "image_path": PATHS,
        "ray_data_stats": stats,  # Ray Data's per-operator times and rows for this run (ds.stats())
        "phases_s": {**(phases or {}), "commit": round(time.time() - started - sum((phases or {}).values()), 3)},
        **({"input_changes": input_changes} if input_changes else {}),  # files added, changed or removed since
    }
    if fence is not None:
        fence.guard()
    write_json(fs, join(root, SUMMARY), result.summary)
    # 4. Job-level metrics and the report: read from the committed data, so neither can cost it. One that fails
    # is named in the summary (`metrics_error`, `report_error`); `promptmill evaluate` / `report` redo it
    if spec.metrics.reference or spec.output.report or configured(spec.tracking):
        run = Run(out_url, spec.output.storage_options, summary=result.summary)  # reads the committed metadata
        if spec.metrics.reference:
            from promptmill.pipelines.runs.reference import evaluate_run  # torch and torchmetrics: ~2 s of the driver's start

            m = spec.metrics
            _after_commit(fs, root, run, "metrics_error", lambda: evaluate_run(
                run, m.reference, spec.scoring.judge, max_images=m.max_images,
                reference_storage_options=m.storage_options, image_column=m.image_column,
                judge_storage_options=spec.scoring.storage_options, clip_url=spec.scoring.clip))
        if spec.output.report:
            _after_commit(fs, root, run, "report_error", lambda: write_report(run))
        if configured(spec.tracking):  # once per run, here in the driver: never from the actors
            _track(spec, fs, root, run)
        result.summary = run.summary
    # 5. Done: _SUCCESS last, then staging goes
    if plan is not None:
        record(fs, root, plan)
    if fence is not None:
        fence.check()
    fs.pipe(success, b"")
    if fs.exists(join(root, STAGING)):
        fs.rm(join(root, STAGING), recursive=True)
    return result
