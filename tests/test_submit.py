"""Ray Jobs submission against a real head (`ray start --head`, dashboard and token auth on), reading from
and writing to a moto S3: submit streaming the logs as `ray job submit` does, a double submit that does not run
twice, a failed submission retried as the next attempt, stop / delete / list, status, logs, outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from conftest import _free_port, kill_session

HANG_GUARD_S = 300  # how long a state change may take before a test calls it a hang (never a speed claim)
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CURRENT = Path("/tmp/ray/ray_current_cluster")  # where `ray start` records itself for ray.init()


@pytest.fixture(scope="module")
def head():
    port, dash, agent, grpc, metrics, runtime_env = (_free_port() for _ in range(6))
    temp = tempfile.mkdtemp(prefix="pmray", dir="/tmp")  # short: Ray's socket paths must fit 107 chars
    before = CURRENT.read_text() if CURRENT.exists() else None
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}",  # the job's `python` is this venv's
           "PROMPTMILL_CACHE": f"{temp}/cache"}  # model copies from S3 stay out of the user's cache
    proc = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             '--resources={"promptmill_slot": 2}',
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={grpc}",
                             f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
                             f"--temp-dir={temp}", "--disable-usage-stats"],  # own ports: other Rays may run here
                            env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # 401: up, and token authentication is on (Ray's default)
                break
            except OSError:
                assert time.time() - t0 < 120, "the Ray head did not come up"
                time.sleep(1)
        yield address
    finally:
        kill_session(proc.pid)
        if before is None:
            CURRENT.unlink(missing_ok=True)
        else:
            CURRENT.write_text(before)


def _cli(args: list[str], s3: dict, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "AWS_ENDPOINT_URL": s3["endpoint_url"],
           "AWS_ACCESS_KEY_ID": s3["key"], "AWS_SECRET_ACCESS_KEY": s3["secret"], "AWS_DEFAULT_REGION": "us-east-1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "promptmill.jobs.cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_submit_wait_status_logs_and_no_double_run(head, s3, tmp_path):
    fs = s3fs.S3FileSystem(**s3)
    prompts = ["a small red circle on the left", "a large blue square above a green triangle", "", "a tiny white diamond"]
    with fs.open("bucket/submit/in/prompts.parquet", "wb") as fh:
        pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "prompt": prompts}), fh)
    spec = {"name": "submitted", "input": {"path": "s3://bucket/submit/in", "id_column": "id"},
            "models": [{"name": "gan", "family": "gan", "checkpoint": "shipped:gan",  # resolves in the working_dir
                        "images_per_prompt": 2, "resources": {"batch_size": 4}}],
            "output": {"path": "s3://bucket/submit/out"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    first = _cli(["submit", str(path), "--address", head, "--timeout", "300", "--pass-aws-credentials",
                  "--metadata-json", '{"team": "ads"}', "--runtime-env-json", '{"env_vars": {"TEAM": "ads"}}',
                  "--entrypoint-memory", "100000000", "--entrypoint-resources", '{"promptmill_slot": 1}',
                  "--headers", '{"X-Promptmill-Team": "ads"}', "--verify", "false"], s3)
    sid = first.stdout.split()[0]
    assert first.returncode == 0, first.stdout + first.stderr + _cli(["logs", sid, "--address", head], s3).stdout[-3000:]
    assert sid.startswith("promptmill-submitted-") and "submitted" in first.stdout and "SUCCEEDED" in first.stdout
    assert "6 images (6 in output), 1 rejected" in first.stdout  # the logs streamed by default
    assert fs.exists("bucket/submit/out/_SUCCESS")
    rows = pq.read_table(fs.open(fs.ls("bucket/submit/out/metadata")[0])).to_pylist()
    assert len(rows) == 6 and {r["id"] for r in rows} == {"a", "b", "d"}
    assert all(r["clip_score"] is not None for r in rows)  # shipped scorers travelled with the working_dir
    stamp = fs.info("bucket/submit/out/_SUCCESS")["LastModified"]

    again = _cli(["submit", str(path), "--address", head, "--wait"], s3)
    assert again.returncode == 0 and f"{sid} already submitted" in again.stdout, again.stdout + again.stderr
    fs.invalidate_cache()
    assert fs.info("bucket/submit/out/_SUCCESS")["LastModified"] == stamp  # not run twice

    status = json.loads(_cli(["status", sid, "--address", head], s3).stdout)
    assert status["status"] == "SUCCEEDED"
    assert status["metadata"]["team"] == "ads" and status["metadata"]["attempt"] == "1"
    assert status["progress"].startswith("6 / 6 images (100 %)") and "1 rejected" in status["progress"], status
    logs = _cli(["logs", sid, "--address", head], s3)
    assert "6 images (6 in output), 1 rejected" in logs.stdout, logs.stdout[-2000:]


@pytest.mark.slow  # 62 s: make chaos; test_submit_wait_status_logs_and_no_double_run stays by default
def test_a_failed_submission_is_retried_as_the_next_attempt_then_stop_delete_list(head, s3, tmp_path):
    fs = s3fs.S3FileSystem(**s3)
    spec = {"name": "retried", "input": {"path": "s3://bucket/retried/in", "id_column": "id"},
            "models": [{"name": "gan", "family": "gan", "checkpoint": "shipped:gan"}],
            "scoring": {"enabled": False}, "output": {"path": "s3://bucket/retried/out", "report": False}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = ["--address", head, "--timeout", "300", "--pass-aws-credentials"]
    failed = _cli(["submit", str(path), *env], s3)  # the input is not there yet: the job fails on the cluster
    sid = failed.stdout.split()[0]
    assert failed.returncode == 1 and f"{sid} FAILED" in failed.stdout and "input.path" in failed.stdout, failed.stdout
    with fs.open("bucket/retried/in/prompts.parquet", "wb") as fh:
        pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a red circle", "a blue square"]}), fh)
    retried = _cli(["submit", str(path), *env], s3)
    assert retried.returncode == 0 and retried.stdout.split()[:2] == [f"{sid}-a2", "submitted"], retried.stdout
    assert json.loads(_cli(["status", f"{sid}-a2", "--address", head], s3).stdout)["metadata"]["attempt"] == "2"
    again = _cli(["submit", str(path), *env], s3)  # succeeded: one at a time, no third attempt
    assert again.stdout.split()[:3] == [f"{sid}-a2", "already", "submitted"], again.stdout
    assert fs.exists("bucket/retried/out/_SUCCESS")

    spec["output"]["path"] = "s3://bucket/retried/stopped"
    path.write_text(yaml.safe_dump(spec))
    queued = _cli(["submit", str(path), "--no-wait", *env], s3)
    other = queued.stdout.split()[0]
    assert queued.returncode == 0 and other != sid
    assert "stop requested" in _cli(["stop", other, "--address", head], s3).stdout
    t0 = time.time()
    while json.loads(_cli(["status", other, "--address", head], s3).stdout)["status"] != "STOPPED":
        assert time.time() - t0 < HANG_GUARD_S, "the stopped job never reported STOPPED"  # a hang guard, no speed claim
        time.sleep(1)
    listed = _cli(["list", "--address", head], s3).stdout
    assert all(x in listed for x in (f"{sid}\tFAILED", f"{sid}-a2\tSUCCEEDED", f"{other}\tSTOPPED")), listed
    assert f"{other} deleted" in _cli(["delete", other, "--address", head], s3).stdout
    assert other not in _cli(["list", "--address", head], s3).stdout


def test_submit_a_diffusers_job_reranked_by_a_hugging_face_clip_from_s3(head, s3, tmp_path):
    """Bring your own model, as the README tells a GPU-cluster user: pipeline and CLIP staged on S3, submitted."""
    pytest.importorskip("diffusers", reason="pip install 'promptmill[diffusers]'")
    from tiny_hf import tiny_hf_clip, tiny_sd

    fs = s3fs.S3FileSystem(**s3)
    fs.put(str(tiny_sd(tmp_path / "sd")) + "/", "bucket/byom/models/sd/", recursive=True)
    fs.put(str(tiny_hf_clip(tmp_path / "clip")) + "/", "bucket/byom/models/clip/", recursive=True)
    with fs.open("bucket/byom/in/prompts.parquet", "wb") as fh:
        pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a red circle", "a photo of a cat"]}), fh)
    spec = {"name": "byom", "input": {"path": "s3://bucket/byom/in", "id_column": "id"},
            "models": [{"name": "sd", "family": "diffusers", "checkpoint": "s3://bucket/byom/models/sd",
                        "sampling": {"height": 32, "width": 32, "num_inference_steps": 2, "candidates": 2}}],
            "scoring": {"clip": "s3://bucket/byom/models/clip", "judge": None},
            "output": {"path": "s3://bucket/byom/out"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    run = _cli(["submit", str(path), "--address", head, "--timeout", "300", "--pass-aws-credentials"], s3)
    sid = run.stdout.split()[0]
    assert run.returncode == 0, run.stdout + run.stderr + _cli(["logs", sid, "--address", head], s3).stdout[-3000:]
    rows = pq.read_table(fs.open(fs.ls("bucket/byom/out/metadata")[0])).to_pylist()
    assert sorted(r["id"] for r in rows) == ["a", "b"] and {r["pipeline_class"] for r in rows} == {
        "StableDiffusionPipeline"}
    assert all(r["family"] == "diffusers" and r["candidates"] == 2 and 0 < r["clip_score"] <= 100 for r in rows)
    assert len({round(r["clip_score"], 3) for r in rows}) > 1  # the tiny CLIP's scores are spread, not clamped to 0
    assert fs.exists("bucket/byom/out/report.html") and fs.exists("bucket/byom/out/_SUCCESS")


def test_the_jobs_api_is_reached_with_the_headers_and_tls_setting_given(head, monkeypatch):
    """--headers (an auth proxy's) and --verify reach the client every command uses, as `ray job` passes them;
    $RAY_JOB_HEADERS is the default, as there."""
    import argparse

    from promptmill.jobs.submit import connection
    from promptmill.pipelines.ops.submit import client

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    c = client(head, headers={"X-Promptmill-Team": "ads"}, verify=False)
    assert c._headers["X-Promptmill-Team"] == "ads" and c._verify is False
    assert c.list_jobs() is not None  # the head answers with them
    monkeypatch.setenv("RAY_JOB_HEADERS", '{"X-From-Env": "1"}')
    assert connection(argparse.Namespace(headers=None, verify=True)) == {"headers": {"X-From-Env": "1"}, "verify": True}
    given = connection(argparse.Namespace(headers={"X-Given": "2"}, verify="/etc/ssl/certs"))
    assert given == {"headers": {"X-Given": "2"}, "verify": "/etc/ssl/certs"}


def test_entrypoint_resources_reach_ray_a_job_asking_for_absent_ones_waits(head, s3, tmp_path):
    """--entrypoint-resources goes to Ray as `ray job submit` sends it: the first test's driver held promptmill_slot
    (the head has 2); one asking for a resource no node has stays PENDING until stopped."""
    spec = {"name": "waits", "input": {"path": "s3://bucket/waits/in"},
            "models": [{"name": "gan", "family": "gan", "checkpoint": "shipped:gan"}], "output": {"path": "s3://bucket/waits/out"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    sent = _cli(["submit", str(path), "--address", head, "--no-wait", "--entrypoint-resources", '{"no_such_node": 1}'], s3)
    sid = sent.stdout.split()[0]
    assert sent.returncode == 0 and "submitted" in sent.stdout, sent.stdout + sent.stderr
    time.sleep(5)
    assert json.loads(_cli(["status", sid, "--address", head], s3).stdout)["status"] == "PENDING"
    assert _cli(["stop", sid, "--address", head], s3).returncode == 0
