"""Experiment trackers (MLflow, Weights & Biases): a committed run logged once, by the driver, after its report.

Each tracker run is one promptmill run that committed images: a rerun that completes an output logs a new tracker
run (its own images/s and wall time; the totals are the output's), tagged with the output URL so the runs of one
output group together; a rerun on a complete output logs nothing. Logged: the redacted spec as parameters,
per-model figures as metrics, the clip_score histogram, a sample grid, summary.json and the output URL. The
tracker libraries are imported only when configured; one that is down or raises is a warning line and
`tracking_error` in summary.json, never a failed job.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from promptmill.pipelines.layout import SUMMARY
from promptmill.pipelines.redaction import redact, redact_text
from promptmill.pipelines.runs.report import sample_grid, score_histogram
from promptmill.pipelines.runs.results import Run
from promptmill.pipelines.storage import full_url, join

if TYPE_CHECKING:
    from promptmill.pipelines.spec import JobSpec, MlflowSpec, TrackingSpec, WandbSpec

log = logging.getLogger(__name__)

# tracker -> (import name, extra)
LIBRARIES = {"mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
MAX_PARAM_CHARS = 500  # MLflow keeps 6,000 per value; a long blocklist or prompt template says little as a parameter
_KEY = re.compile(r"[^\w\-./ ]")  # MLflow's allowed key characters (W&B takes these too)


class TrackingError(ValueError):
    """A configured tracker whose library is not installed (a preflight error naming the field)."""


def configured(tracking: TrackingSpec) -> list[str]:
    return [name for name in LIBRARIES if getattr(tracking, name) is not None]


def check_trackers(tracking: TrackingSpec) -> None:
    """Each configured tracker's library is importable (found, not imported: the driver pays for it at the end)."""
    for name in configured(tracking):
        module, extra = LIBRARIES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackingError(f"tracking.{name}: the {module} library is not installed (pip install "
                                f"'promptmill[{extra}]')")


def flat_params(obj: Any, prefix: str = "") -> dict[str, str]:
    """The redacted spec as flat `a.b.0.c` -> text parameters (empty mappings and lists left out)."""
    if isinstance(obj, dict):
        return {k: v for key, val in obj.items() for k, v in flat_params(val, f"{prefix}{_KEY.sub('_', str(key))}.").items()}
    if isinstance(obj, list):
        return {k: v for i, val in enumerate(obj) for k, v in flat_params(val, f"{prefix}{i}.").items()}
    text = json.dumps(obj) if not isinstance(obj, str) else obj
    return {prefix.rstrip("."): text[:MAX_PARAM_CHARS]}


def run_metrics(summary: dict) -> dict[str, float]:
    """Per-model figures (`<model>/<figure>`) and the job's own, as numbers; what a model has no value for is left out."""
    wall = summary.get("wall_s") or 0
    out: dict[str, float] = {}
    for model, scores in (summary.get("scores") or {}).items():
        written = (summary.get("images_written_this_run") or {}).get(model, 0)
        figures = {**scores, "images_written": written, "images_per_s": written / wall if wall else None,
                   **((summary.get("metrics") or {}).get("models") or {}).get(model, {})}
        out.update({f"{model}/{k}": float(v) for k, v in figures.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)})
    for k in ("input_rows", "accepted", "rejected_total", "images_per_s", "wall_s"):
        if isinstance(summary.get(k), int | float):
            out[f"job/{k}"] = float(summary[k])
    return out


def log_run(spec: JobSpec, run: Run) -> dict[str, str]:
    """Log the committed run to every configured tracker; returns {tracker: error text} for those that failed
    (each also a warning line). The tracker's ids go into `run.summary["tracking"]`."""
    params = flat_params(redact(spec.model_dump(mode="json")))
    metrics = run_metrics(run.summary)
    images = {"clip_score_histogram.png": score_histogram(run.metadata, run.models) if len(run.metadata) else None,
              "sample_grid.png": sample_grid(run)}
    links = {"output": redact_text(run.url), "summary_json": redact_text(full_url(run.fs, join(run.root, SUMMARY)))}
    errors, ids = {}, {}
    for name in configured(spec.tracking):
        try:
            ids[name] = _LOGGERS[name](getattr(spec.tracking, name), spec.name, params, metrics, images, links, run)
        except Exception as e:  # noqa: BLE001 - the data is committed; a tracker is a copy of the summary
            errors[name] = redact_text(f"{type(e).__name__}: {e}".splitlines()[0])[:500]
            log.warning("tracking.%s: not logged (%s); the run is complete", name, errors[name])
    if ids:
        run.summary["tracking"] = ids
    return errors


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    """Environment variables set for the block (MLflow reads its HTTP timeouts from there), then restored."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def artifact_location(cfg: MlflowSpec) -> str | None:
    """A new experiment's artifact root: as configured; for a local sqlite store, `mlartifacts/` beside the database
    (MLflow's default is ./mlruns in whatever folder the driver runs in); else the server's default."""
    if cfg.artifact_location or not cfg.uri.startswith("sqlite:///"):
        return cfg.artifact_location
    return os.path.join(os.path.dirname(os.path.abspath(cfg.uri.removeprefix("sqlite:///"))), "mlartifacts")


def _mlflow(cfg: MlflowSpec, job: str, params: dict[str, str], metrics: dict[str, float], images: dict[str, bytes | None],
            links: dict[str, str], run: Run) -> dict[str, str]:
    # a tracker that is down costs ~timeout_s x 3, not MLflow's default 7 retries of 120 s with doubling backoff
    with _env(MLFLOW_HTTP_REQUEST_TIMEOUT=str(int(max(1, cfg.timeout_s))), MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
              MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1"):
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=cfg.uri)
        exp = client.get_experiment_by_name(cfg.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.experiment, artifact_location(cfg))
        tags = {"promptmill.output": links["output"], "promptmill.summary": links["summary_json"]}
        r = client.create_run(exp_id, run_name=cfg.run_name or job, tags=tags)
        run_id, status = r.info.run_id, "FAILED"
        try:
            items = list(params.items())
            for i in range(0, len(items), 100):  # log_batch takes at most 100 parameters per call
                client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
            now = int(time.time() * 1000)
            entries = [Metric(k, v, now, 0) for k, v in metrics.items()]
            for i in range(0, len(entries), 1000):
                client.log_batch(run_id, metrics=entries[i:i + 1000],
                                 tags=[RunTag("mlflow.note.content", f"promptmill run: {links['output']}")] if not i else [])
            client.log_dict(run_id, run.summary, SUMMARY)
            with tempfile.TemporaryDirectory() as d:
                for name, png in images.items():
                    if png:
                        with open(os.path.join(d, name), "wb") as f:
                            f.write(png)
                        client.log_artifact(run_id, os.path.join(d, name))
            status = "FINISHED"
        finally:
            client.set_terminated(run_id, status)
    return {"run_id": run_id, "experiment_id": exp_id}


def _wandb(cfg: WandbSpec, job: str, params: dict[str, str], metrics: dict[str, float], images: dict[str, bytes | None],
           links: dict[str, str], run: Run) -> dict[str, str]:
    if cfg.mode == "disabled":  # W&B logs nothing and keeps no run folder
        return {"mode": "disabled"}
    import numpy as np
    import wandb
    from PIL import Image

    settings = wandb.Settings(init_timeout=cfg.timeout_s, silent=True, console="off")
    if cfg.dir:
        os.makedirs(cfg.dir, exist_ok=True)
    with wandb.init(project=cfg.project, entity=cfg.entity, mode=cfg.mode, dir=cfg.dir, name=cfg.run_name or job,
                    group=links["output"][-128:],  # the runs of one output side by side (W&B keeps 128 characters)
                    config=params, tags=["promptmill"], settings=settings, reinit="create_new") as tracker:
        hist = {f"{m}/clip_score_hist": wandb.Histogram(v) for m in run.models
                if (v := [x for x in run.rows(m).column("clip_score").to_pylist() if x is not None])}
        pics = {name.removesuffix(".png"): wandb.Image(np.asarray(Image.open(io.BytesIO(png))))
                for name, png in images.items() if png}
        tracker.log({**metrics, **hist, **pics})
        tracker.summary.update(links)
        with open(os.path.join(tracker.dir, SUMMARY), "w") as f:  # the run's files folder: uploaded with the run
            json.dump(run.summary, f, default=str)
        return {"run_id": tracker.id, "project": cfg.project, **({"url": tracker.url} if tracker.url else {})}


_LOGGERS = {"mlflow": _mlflow, "wandb": _wandb}
