"""`promptmill generate` as a user runs it, for the benchmarks: a spec file, a fresh process, its summary.json."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import yaml


def run_generate(tmp: Path, name: str, spec: dict, watch: Callable[[psutil.Process, float], None] | None = None,
                 every_s: float = 0.2) -> tuple[float, dict]:
    """(wall s, summary.json) of one job; `watch(driver, seconds since start)` is called every `every_s` while it
    runs (memory or CPU sampling). The spec's output.path is where the summary is read from."""
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "generate", str(tmp / f"{name}.yaml")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    driver = psutil.Process(proc.pid)
    while proc.poll() is None:
        if watch is not None:
            try:
                watch(driver, time.perf_counter() - t)
            except psutil.NoSuchProcess:
                pass
        time.sleep(every_s)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    assert proc.returncode == 0, f"{name}: exit {proc.returncode}: {err[-2000:]}"
    return wall, json.loads((Path(spec["output"]["path"]) / "summary.json").read_text())
