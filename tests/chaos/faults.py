"""What the chaos cases share: a moto S3 that can be stopped and restarted on its port, a throttling proxy in
front of it, a GAN job on it run as a user runs it (`python -m promptmill.jobs.cli generate`, its own embedded Ray), and
the check every case ends with: one image and one metadata row per (id, model, sample), nothing left in
`_staging/`, summary counts equal to the tables.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
import yaml
from conftest import _free_port

ROOT = Path(__file__).resolve().parents[2]
SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
             b"<Message>Please reduce your request rate.</Message><RequestId>chaos</RequestId></Error>")


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
        return s3fs.S3FileSystem(endpoint_url=self.url, key="testing", secret="testing", skip_instance_cache=True)


class Throttle:
    """An HTTP proxy in front of the store that answers every `every`-th request with 503 SlowDown, as S3 does
    under load (the request is not forwarded: the client must send it again)."""

    def __init__(self, upstream_port: int, every: int) -> None:
        self.every, self.requests, self.throttled = every, 0, 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    outer.requests += 1
                    throttle = outer.requests % outer.every == 0
                    outer.throttled += throttle
                if throttle:
                    self._reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                conn.request(self.command, self.path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
                out = {k: v for k, v in r.getheaders()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length")}
                conn.close()
                self._reply(r.status, out, data, length=r.getheader("Content-Length"))

            def _reply(self, status: int, headers: dict, data: bytes, length: str | None = None) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                # a HEAD reply announces the object's length without sending it
                self.send_header("Content-Length", length if self.command == "HEAD" and length else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", _free_port()), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()



@pytest.fixture(name="store")
def store_fixture():
    """A moto S3 server with a `chaos` bucket, stopped after the test (imported by each chaos module)."""
    s = Store()
    s.fs().mkdir("chaos")
    yield s
    s.stop()

def write_job(store: Store, tmp_path: Path, n: int, retry: dict | None = None, endpoint: str | None = None,
              batch_size: int = 32) -> tuple[Path, dict]:
    """n prompts on the store and a GAN spec writing back to it; the env points the job at `endpoint` (the store,
    or a proxy in front of it)."""
    fs = store.fs()
    ids = [f"p{i:05d}" for i in range(n)]
    prompts = ["a small red circle on the left" if i % 2 else "a large blue square above a green triangle"
               for i in range(n)]
    with fs.open("chaos/in/prompts.parquet", "wb") as fh:
        pq.write_table(pa.table({"id": ids, "prompt": prompts}), fh)
    spec = {"name": "chaos", "input": {"path": "s3://chaos/in", "id_column": "id"},
            "models": [{"name": "gan", "family": "gan", "checkpoint": "shipped:gan",
                        "resources": {"batch_size": batch_size}}],
            "scoring": {"enabled": False}, "output": {"path": "s3://chaos/out", "report": False}}
    if retry:
        spec["storage"] = {"retry": retry}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "AWS_ENDPOINT_URL": endpoint or store.url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    env.pop("RAY_ADDRESS", None)
    return path, env


def run(path: Path, env: dict) -> subprocess.Popen:
    """`promptmill generate` in its own session (so the kill cases can take down the driver with its Ray)."""
    return subprocess.Popen([sys.executable, "-m", "promptmill.jobs.cli", "generate", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def images_written(store: Store) -> int:
    try:
        return len(store.fs().find("chaos/out/images"))
    except (FileNotFoundError, OSError):
        return 0


def wait_for_images(store: Store, proc: subprocess.Popen, images: int, timeout: float = 240) -> None:
    t0 = time.time()
    while images_written(store) < images:
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"the job wrote fewer than {images} images in {timeout} s"
        time.sleep(0.5)


def generator_actors(session: int) -> list[psutil.Process]:
    """The job's generator actor processes (Ray names them ray::GenerateStage...), in its own session only."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "GenerateStage" in " ".join(p.info["cmdline"] or []) and os.getsid(p.pid) == session:
                found.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def exactly_once(store: Store, n: int) -> None:
    fs = store.fs()
    rows = [r for p in fs.find("chaos/out/metadata") for r in pq.read_table(fs.open(p)).to_pylist()]
    keys = [(r["id"], r["model"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == n
    images = [p for p in fs.find("chaos/out/images") if p.endswith(".png")]  # not imagefolder's metadata.jsonl
    assert len(images) == n and {f"chaos/out/{r['image_path']}" for r in rows} == set(images)  # relative to the output
    assert not fs.exists("chaos/out/_staging") and fs.exists("chaos/out/_SUCCESS")
    summary = json.loads(fs.cat_file("chaos/out/summary.json"))
    assert summary["images_total"] == {"gan": n} and summary["accepted"] == n


def measured(fault: str, **figures) -> None:
    """One line per case with what it measured (docs/benchmarks.md's reliability table quotes them; `pytest -s` shows it)."""
    print(f"\nchaos: {fault}: " + ", ".join(f"{k} {v}" for k, v in figures.items()))
