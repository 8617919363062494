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
from promptmill.models.shapes.scenes import example

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


SETTLED_MS = 0.05  # CPU ms to create and write a 3 KB file on this machine with no deletions behind it: 0.025-0.035


def file_create_ms(tmp: Path, n: int = 200) -> float:
    """CPU ms to create and write one 3 KB file, over `n` new files in a new folder under `tmp`. They are kept
    (with the benchmark's temporary folder): deleting them would itself slow the next creations (`settle_disk`)."""
    folder = tmp / f"probe-{os.urandom(4).hex()}"
    folder.mkdir(parents=True)
    data = os.urandom(3000)
    t = time.process_time()
    for i in range(n):
        (folder / f"{i}.png").write_bytes(data)
    return (time.process_time() - t) / n * 1e3


def settle_disk(tmp: Path, max_wait_s: float = 330, every_s: float = 5) -> float:
    """Wait until creating a file costs its usual CPU again (at most `max_wait_s`); returns the last probe, ms
    per file.

    On this machine creating a file or a folder costs 0.025-0.035 ms of CPU when the disk is quiet, and 0.1-1.7 ms
    for a minute or so after many files were created or deleted: after 16,000 files were created, synced and
    deleted (a /tmp script, 300 new files every 10 s: 0.15-0.41 ms each up to 52 s, 0.06 at 73 s), and after a
    2,048-image job alone (every 5 s after it: 0.13-0.49 ms for 40 s). The root ext4 has no journal
    (`/proc/fs/jbd2` is empty); the kernel writing the inode tables back is the likely cause (`sync` ended it in
    one test), not proven. A job that writes a file per image pays it and the bare model loop does not: in an
    unscored 16,384-image GAN job the actor's file creation took 0.5-0.8 ms per file after a slow probe and
    0.03 after a quiet one, 498-512 against 609 img/s (`cpu_split.py`), and issue 17's unscored GAN row moved
    most between runs."""
    waited, t = 0.0, time.monotonic()
    while (ms := file_create_ms(tmp)) > SETTLED_MS and waited < max_wait_s:
        if not waited:
            print(f"creating a file costs {ms:.2f} ms of CPU (files created or deleted just before): waiting up to "
                  f"{max_wait_s:.0f} s", file=sys.stderr, flush=True)
        time.sleep(every_s)
        waited = time.monotonic() - t
    return ms


def run_generate(tmp: Path, name: str, spec: dict, watch: Callable[[psutil.Process, float], None] | None = None,
                 every_s: float = 0.2, settle: bool = True,
                 on_stderr: Callable[[bytes], None] | None = None) -> tuple[float, dict]:
    """(wall s, summary.json) of one job; `watch(driver, seconds since start)` is called every `every_s` while it
    runs (memory or CPU sampling). The spec's output.path is where the summary is read from. The summary gains
    `outside_s`: seconds before run_job started (interpreter, imports, CLI) and after the CLI printed its result
    line (Ray's shutdown, interpreter exit), `file_create_ms`: the disk's state at the start (`settle_disk`,
    waited for unless `settle` is False), and `started_at`: `time.perf_counter()` when the process started (after
    the disk probe and any wait), which `outside_s` and the wall time count from. `on_stderr(line)` sees each line
    the job logs as it comes (its progress lines, for rates over time)."""
    created_ms = settle_disk(tmp) if settle else file_create_ms(tmp)
    (tmp / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "promptmill.jobs.cli", "generate", str(tmp / f"{name}.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})  # the result line when printed
    printed: list[float] = []  # when the CLI's result line ("... -> <output>") came
    err: deque[bytes] = deque(maxlen=200)  # stderr's tail, drained as it comes: Ray Data logs its progress there, and a full pipe
    # blocked the job's streaming executor mid-run (a 100k run stopped at 41k images)

    def drain_stderr() -> None:
        for line in proc.stderr:
            err.append(line)
            if on_stderr is not None:
                on_stderr(line)

    readers = [threading.Thread(target=lambda: [printed.append(time.perf_counter()) for line in proc.stdout
                                                if b" -> " in line], daemon=True),
               threading.Thread(target=drain_stderr, daemon=True)]
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
    summary["file_create_ms"], summary["started_at"] = round(created_ms, 3), t
    return end - t, summary
