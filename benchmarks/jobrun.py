"""`promptmill generate` as a user runs it, for the benchmarks: a spec file, a fresh process, its summary.json;
and the one-model spec and prompt table they all run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from models.shapes import example

SHIPPED_NAME = {"gan": "gan", "transformer": "dalle"}  # family -> its shipped checkpoint (models/shipped/<name>)


def write_prompts(path: Path, n: int, distinct: int | None = None) -> list[str]:
    """A prompt table of n rows (ids p0..) from the shapes grammar's test split, `distinct` prompts cycled."""
    prompts = [example(i, 1, "test")[1] for i in range(min(n, distinct or n))]
    rows = [prompts[i % len(prompts)] for i in range(n)]
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(n)], "prompt": rows}), path)
    return rows


def one_model_spec(name: str, prompts: Path, out: Path, family: str, scoring: bool | None = None,
                   resources: dict | None = None, model: str = "m", scoring_extra: dict | None = None) -> dict:
    """The default spec around one shipped model, report off; `scoring` None keeps the default."""
    m = {"name": model, "family": family, "checkpoint": f"shipped:{SHIPPED_NAME[family]}"}
    if resources:
        m["resources"] = resources
    spec = {"name": name, "input": {"path": str(prompts), "id_column": "id"}, "models": [m],
            "output": {"path": str(out), "report": False}}
    if scoring is not None or scoring_extra:
        spec["scoring"] = {**({"enabled": scoring} if scoring is not None else {}), **(scoring_extra or {})}
    return spec


def run_generate(tmp: Path, name: str, spec: dict, watch: Callable[[psutil.Process, float], None] | None = None,
                 every_s: float = 0.2) -> tuple[float, dict]:
    """(wall s, summary.json) of one job; `watch(driver, seconds since start)` is called every `every_s` while it
    runs (memory or CPU sampling). The spec's output.path is where the summary is read from. The summary gains
    `outside_s`: seconds before run_job started (interpreter, imports, CLI) and after the CLI printed its result
    line (Ray's shutdown, interpreter exit)."""
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "generate", str(tmp / f"{name}.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # the result line when printed
    printed: list[float] = []  # when the CLI's result line ("... -> <output>") came
    err: deque[bytes] = deque(maxlen=200)  # stderr's tail, drained as it comes: Ray Data logs its progress there, and a full pipe
    # blocked the job's streaming executor mid-run (a 100k run stopped at 41k images)
    readers = [threading.Thread(target=lambda: [printed.append(time.perf_counter()) for line in proc.stdout
                                                if b" -> " in line], daemon=True),
               threading.Thread(target=lambda: [err.append(line) for line in proc.stderr], daemon=True)]
    for r in readers:
        r.start()
    driver = psutil.Process(proc.pid)
    while proc.poll() is None:
        if watch is not None:
            try:
                watch(driver, time.perf_counter() - t)
            except psutil.NoSuchProcess:
                pass
        time.sleep(every_s)
    end = time.perf_counter()
    for r in readers:
        r.join(5)
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}: {b''.join(err).decode(errors='replace')[-4000:]}"
    summary = json.loads((Path(spec["output"]["path"]) / "summary.json").read_text())
    after = end - printed[-1] if printed else 0.0
    summary["outside_s"] = {"start": round(end - t - after - summary["wall_s"], 3), "exit": round(after, 3)}
    return end - t, summary
