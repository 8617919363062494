"""Experiment trackers (`pipelines/runs/tracking.py`) with the real libraries: a local MLflow store (sqlite: MLflow
3.18 refuses a file:/ store) and W&B offline, read back; trackers that are down never fail the job."""

from __future__ import annotations

import glob
import json
import logging
import socket
from pathlib import Path

import pytest
from conftest import make_spec, write_prompts
from PIL import Image
from promptmill.pipelines.runs import tracking
from promptmill.pipelines.spec import TrackingSpec, load_spec

mlflow = pytest.importorskip("mlflow")
wandb = pytest.importorskip("wandb")

PROMPTS = ["a small red circle on the left", "a large blue square above a green triangle", "big yellow triangle, top"]
SECRET = "s3cr3t-value-never-logged"


@pytest.fixture
def wandb_home(tmp_path, monkeypatch) -> Path:
    """W&B's own folders (settings, cache, artifacts) in the test's tmp, and nothing printed."""
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "wandb"


def _spec(tmp_path: Path, checkpoints, tracking_section: dict, **extra) -> dict:
    write_prompts(tmp_path / "in.parquet", PROMPTS, ["a", "b", "c"])
    out = str(tmp_path / "out")
    spec = make_spec(str(tmp_path / "in.parquet"), out, checkpoints, tracking=tracking_section,
                     output={"path": out, "report": False},
                     metrics={"storage_options": {"key": "${PM_TEST_SECRET}"}}, **extra)
    spec["models"][0]["images_per_prompt"] = 1
    return spec


def wandb_records(path: str) -> list:
    """The records of an offline run's `.wandb` file: W&B's header, then LevelDB's log format (32 KiB blocks of
    chunks: crc32, length, type FULL/FIRST/MIDDLE/LAST), each record a `wandb_internal_pb2.Record`."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0:  # zero-filled rest of a block
            pos += left
            continue
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def test_a_run_is_logged_once_per_completing_run_to_mlflow_and_wandb_offline(ray_local, checkpoints, tmp_path, monkeypatch,
                                                                            wandb_home):
    from mlflow.tracking import MlflowClient
    from promptmill.pipelines.batch.job import run_job

    monkeypatch.setenv("PM_TEST_SECRET", SECRET)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    section = {"mlflow": {"uri": uri, "experiment": "pm-test", "artifact_location": str(tmp_path / "mlartifacts")},
               "wandb": {"project": "pm-test", "mode": "offline", "dir": str(wandb_home)}}
    spec = _spec(tmp_path, checkpoints, section)
    spec["input"]["limit"] = 2  # the first run makes 2 of the 3 images; the rerun completes the output
    first = run_job(load_spec(spec))
    del spec["input"]["limit"]
    second = run_job(load_spec(spec))
    assert sum(second.images_written.values()) == 1 and (tmp_path / "out" / "_SUCCESS").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "tracking_error" not in summary
    third = run_job(load_spec(spec))  # complete already: nothing new, nothing logged
    assert third.skipped

    # MLflow: one tracker run per run that committed images, both tagged with the output
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("pm-test")
    runs = sorted(client.search_runs([exp.experiment_id]), key=lambda r: r.info.start_time)
    assert [r.info.run_id for r in runs] == [first.summary["tracking"]["mlflow"]["run_id"],
                                             summary["tracking"]["mlflow"]["run_id"]]
    out_url = summary["output"]
    assert {r.data.tags["promptmill.output"] for r in runs} == {out_url}
    last = runs[-1]
    assert last.info.status == "FINISHED" and last.info.run_name == "test"
    p, m = last.data.params, last.data.metrics
    assert p["models.0.name"] == "gan" and p["seed"] == "0" and p["output.format"] == "files"
    assert p["metrics.storage_options.key"] == "***" and not any(SECRET in v for v in p.values())
    assert m["gan/images"] == 3 and m["gan/images_written"] == 1 and runs[0].data.metrics["gan/images"] == 2
    assert m["gan/clip_score_mean"] == pytest.approx(summary["scores"]["gan"]["clip_score_mean"])
    assert m["job/input_rows"] == 3 and m["gan/images_per_s"] > 0
    assert {a.path for a in client.list_artifacts(last.info.run_id)} == {
        "summary.json", "clip_score_histogram.png", "sample_grid.png"}
    grid = Image.open(client.download_artifacts(last.info.run_id, "sample_grid.png", str(tmp_path / "dl")))
    assert grid.size == (3 * 96, 96)  # one row per model, the first prompts' sample 0, 32 px upscaled to 96

    # W&B offline: two runs on disk, read back from their .wandb files
    files = sorted(glob.glob(str(wandb_home / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(files) == 2
    records, run_dir = wandb_records(files[-1]), Path(files[-1]).parent
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    config.update({i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "run"
                   for i in r.run.config.update})
    # history items: a number under its key; media and histograms as nested keys (name, field)
    history = {(i.key,) if i.key else tuple(i.nested_key): json.loads(i.value_json) for r in records
               if r.WhichOneof("record_type") == "history" for i in r.history.item}
    assert config["models.0.name"] == "gan" and config["metrics.storage_options.key"] == "***"
    assert {r.run.run_group for r in records if r.WhichOneof("record_type") == "run"} == {out_url[-128:]}
    assert history[("gan/images",)] == 3
    assert history[("gan/clip_score_hist", "_type")] == "histogram"
    assert history[("sample_grid", "_type")] == history[("clip_score_histogram", "_type")] == "image-file"
    assert len(glob.glob(str(run_dir / "files" / "media" / "images" / "*.png"))) == 2
    assert json.loads((run_dir / "files" / "summary.json").read_text())["images_total"] == {"gan": 3}
    assert not any(SECRET.encode() in Path(f).read_bytes() for f in glob.glob(str(run_dir / "**" / "*"), recursive=True)
                   if Path(f).is_file())
    assert summary["tracking"]["wandb"]["run_id"] in files[-1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_trackers_that_are_down_never_fail_the_job(ray_local, checkpoints, tmp_path, monkeypatch, wandb_home, caplog):
    from promptmill.pipelines.batch.job import run_job

    port = _closed_port()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("PM_TEST_SECRET", SECRET)
    section = {"mlflow": {"uri": f"http://127.0.0.1:{port}", "timeout_s": 1},
               "wandb": {"project": "pm-test", "mode": "online", "dir": str(wandb_home), "timeout_s": 3}}
    with caplog.at_level(logging.WARNING, logger="promptmill.pipelines.runs.tracking"):
        result = run_job(load_spec(_spec(tmp_path, checkpoints, section, scoring={"enabled": False})))
    assert sum(result.images_written.values()) == 3 and (tmp_path / "out" / "_SUCCESS").exists()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    err = summary["tracking_error"]
    assert err.startswith("tracking.mlflow: ") and "; tracking.wandb: " in err and "tracking" not in summary
    ours = [r.getMessage().split(" (")[0] for r in caplog.records if r.name == tracking.log.name]
    assert ours == ["tracking.mlflow: not logged", "tracking.wandb: not logged"], [r.name for r in caplog.records]


def test_a_missing_tracker_library_is_a_preflight_error_naming_the_field_and_the_extra(monkeypatch):
    spec = TrackingSpec.model_validate({"mlflow": "sqlite:///x.db", "wandb": {"project": "p", "mode": "offline"}})
    tracking.check_trackers(spec)  # both installed here
    monkeypatch.setitem(tracking.LIBRARIES, "wandb", ("promptmill_no_such_module", "wandb"))
    with pytest.raises(tracking.TrackingError, match=r"tracking\.wandb: .* \(pip install 'promptmill\[wandb\]'\)"):
        tracking.check_trackers(spec)


def test_spec_tracking_section_names_the_bad_field():
    from promptmill.pipelines.spec import SpecError

    assert TrackingSpec.model_validate({"mlflow": "http://mlflow:5000"}).mlflow.uri == "http://mlflow:5000"
    with pytest.raises(SpecError, match=r"tracking\.wandb\.mode"):
        load_spec({"name": "t", "input": {"path": "x"}, "models": [{"name": "g", "family": "gan", "checkpoint": "x"}],
                   "output": {"path": "o"}, "tracking": {"wandb": {"project": "p", "mode": "sometimes"}}})
    with pytest.raises(SpecError, match=r"tracking\.mlflow\.experimnt"):
        load_spec({"name": "t", "input": {"path": "x"}, "models": [{"name": "g", "family": "gan", "checkpoint": "x"}],
                   "output": {"path": "o"}, "tracking": {"mlflow": {"uri": "u", "experimnt": "e"}}})


def test_a_local_sqlite_store_keeps_artifacts_beside_its_database():
    from promptmill.pipelines.spec import MlflowSpec

    assert tracking.artifact_location(MlflowSpec(uri="sqlite:////data/mlflow.db")) == "/data/mlartifacts"
    assert tracking.artifact_location(MlflowSpec(uri="http://mlflow:5000")) is None  # the server's
    assert tracking.artifact_location(MlflowSpec(uri="sqlite:////d/m.db", artifact_location="s3://b/a")) == "s3://b/a"


def test_flat_params_and_metrics_from_a_summary():
    assert tracking.flat_params({"a": {"b": [1, {"c": None}]}, "s": "x" * 600}) == {
        "a.b.0": "1", "a.b.1.c": "null", "s": "x" * tracking.MAX_PARAM_CHARS}
    summary = {"wall_s": 2.0, "images_written_this_run": {"m": 4}, "input_rows": 5,
               "scores": {"m": {"images": 8, "clip_score_mean": 30.5, "prompt_match": None, "candidates": 1}},
               "metrics": {"models": {"m": {"fid": 12.5}}}}
    assert tracking.run_metrics(summary) == {"m/images": 8.0, "m/clip_score_mean": 30.5, "m/candidates": 1.0,
                                             "m/images_written": 4.0, "m/images_per_s": 2.0, "m/fid": 12.5,
                                             "job/input_rows": 5.0, "job/wall_s": 2.0}
