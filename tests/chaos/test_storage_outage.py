"""The object store goes away mid-job (a moto server stopped and started again on the same port, its buckets kept):
a short outage is ridden through without a rerun, one longer than the retry budget ends in exit 3 with one line,
and the same command then finishes. After each: one image and one metadata row per (id, model, sample), nothing
left in `_staging/`, summary counts equal to the tables.

The 10 s outage and the over-budget case run in the default suite; the 60 s outage is marked `chaos` (make chaos).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from conftest import _free_port

ROOT = Path(__file__).resolve().parents[2]


class Store:
    """A moto S3 that can be taken down and brought back on its port (moto's state is process-global)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.cls, self.port = ThreadedMotoServer, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.start()
        urllib.request.urlopen(urllib.request.Request(f"{self.url}/moto-api/reset", method="POST"))

    def start(self) -> None:
        self.server = self.cls(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def fs(self) -> s3fs.S3FileSystem:
        fs = s3fs.S3FileSystem(endpoint_url=self.url, key="testing", secret="testing", skip_instance_cache=True)
        return fs


@pytest.fixture
def store():
    s = Store()
    s.fs().mkdir("chaos")
    yield s
    s.stop()


def _job(store: Store, tmp_path: Path, n: int, retry: dict | None = None) -> tuple[Path, dict]:
    fs = store.fs()
    ids = [f"p{i:05d}" for i in range(n)]
    prompts = ["a small red circle on the left" if i % 2 else "a large blue square above a green triangle"
               for i in range(n)]
    with fs.open("chaos/in/prompts.parquet", "wb") as fh:
        pq.write_table(pa.table({"id": ids, "prompt": prompts}), fh)
    spec = {"name": "chaos", "input": {"path": "s3://chaos/in", "id_column": "id"},
            "models": [{"name": "gan", "family": "gan", "checkpoint": str(ROOT / "checkpoints" / "gan"),
                        "resources": {"batch_size": 32}}],
            "scoring": {"enabled": False}, "output": {"path": "s3://chaos/out", "report": False}}
    if retry:
        spec["storage"] = {"retry": retry}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "AWS_ENDPOINT_URL": store.url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    env.pop("RAY_ADDRESS", None)
    return path, env


def _run(path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "generate", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _images_written(store: Store) -> int:
    try:
        return len(store.fs().find("chaos/out/images"))
    except (FileNotFoundError, OSError):
        return 0


def _outage_after(store: Store, proc: subprocess.Popen, images: int, seconds: float) -> None:
    t0 = time.time()
    while _images_written(store) < images:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 240, "the job wrote nothing"
        time.sleep(0.5)
    store.stop()
    time.sleep(seconds)
    store.start()


def _exactly_once(store: Store, n: int) -> None:
    fs = store.fs()
    rows = [r for p in fs.find("chaos/out/metadata") for r in pq.read_table(fs.open(p)).to_pylist()]
    keys = [(r["id"], r["model"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == n
    images = fs.find("chaos/out/images")
    assert len(images) == n and {r["image_path"].split("://", 1)[-1] for r in rows} == set(images)
    assert not fs.exists("chaos/out/_staging") and fs.exists("chaos/out/_SUCCESS")
    summary = json.loads(fs.cat_file("chaos/out/summary.json"))
    assert summary["images_total"] == {"gan": n} and summary["accepted"] == n


def test_a_10_second_outage_mid_job_is_ridden_through(store, tmp_path):
    path, env = _job(store, tmp_path, 400)
    proc = _run(path, env)
    _outage_after(store, proc, 80, 10)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert "retry" in err  # the workers said so while they waited
    _exactly_once(store, 400)


def test_an_outage_past_the_budget_is_one_line_exit_3_then_the_same_command_finishes(store, tmp_path):
    path, env = _job(store, tmp_path, 400, retry={"attempts": 3, "max_wait_s": 5})
    proc = _run(path, env)
    t0 = time.time()
    while _images_written(store) < 80:
        assert proc.poll() is None and time.time() - t0 < 240, proc.communicate()
        time.sleep(0.5)
    store.stop()
    out, err = proc.communicate(timeout=300)
    store.start()
    assert proc.returncode == 3, err[-3000:]
    line = [ln for ln in err.splitlines() if ln.startswith("promptmill: error:")]
    assert len(line) == 1 and "storage: " in line[0] and "failed after" in line[0] and "attempts over" in line[0], err
    assert "Traceback" not in err.split(line[0])[1]  # the traceback only with --verbose
    rerun = _run(path, env)
    _, err2 = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, err2[-3000:]
    _exactly_once(store, 400)


@pytest.mark.chaos
def test_a_60_second_outage_mid_job_is_ridden_through(store, tmp_path):
    path, env = _job(store, tmp_path, 1000)
    proc = _run(path, env)
    _outage_after(store, proc, 150, 60)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    _exactly_once(store, 1000)
