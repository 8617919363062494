"""The planning half of `benchmarks/scale.py`: synthetic inputs of many Parquet files written streaming (id + prompt),
synthetic finished metadata in the real schema, and one `--dry-run`'s planning (`dry_run`, in a fresh process)
measured: driver peak RSS, the object store's peak, bytes spilled, wall time.

    python benchmarks/scale.py --planning-only [--rows 1000000 10000000] [--finished 1000000 10000000]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROWS_PER_FILE = 1_000_000
PROMPTS = ["a small red circle left of a large blue square", "a large green triangle above a small yellow diamond",
           "a purple square in the center", "two blue circles, one above the other", "a small orange triangle"]


def _ids(start: int, n: int) -> pa.Array:
    return pc.binary_join_element_wise("p", pc.cast(pa.array(range(start, start + n), pa.int64()), pa.string()), "")


def write_input(folder: Path, rows: int) -> None:
    """`rows` rows (ids p0.., five prompts cycled) in files of ROWS_PER_FILE rows, one file in memory at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    prompts = pa.array(PROMPTS)
    for k, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        which = pc.remainder(pa.array(range(start, start + n), pa.int64()), len(PROMPTS))
        t = pa.table({"id": _ids(start, n), "prompt": prompts.take(which)})
        pq.write_table(t, folder / f"part-{k:05d}.parquet", row_group_size=128 * 1024)


def write_finished(out: Path, keys: int, model: str, spec: dict) -> None:
    """An output holding `keys` finished samples (ids p0.., sample 0) of `model`: committed metadata parts in the
    layout's schema (the other columns null) and the `_spec.json` this spec's run would have recorded."""
    from promptmill.pipelines.batch.preflight import fingerprint
    from promptmill.pipelines.layout import METADATA_SCHEMA
    from promptmill.pipelines.spec import JobSpec

    (out / "metadata").mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, keys, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, keys - start)
        ids = _ids(start, n)
        cols = {f.name: pa.nulls(n, f.type) for f in METADATA_SCHEMA}
        cols.update(id=ids, model=pa.array([model] * n), sample=pa.array([0] * n, pa.int32()),
                    image_path=pc.binary_join_element_wise("images/", model, "/x/", ids, "-0.png", ""))
        pq.write_table(pa.table(cols, schema=METADATA_SCHEMA), out / "metadata" / f"part-bench000-{k:05d}.parquet")
    (out / "_spec.json").write_text(json.dumps(fingerprint(JobSpec(**spec))))


CHILD = r"""
import json, sys, threading, time
import psutil, ray
from ray._private.internal_api import get_memory_info_reply, get_state_from_address
from promptmill.pipelines.batch.dry_run import dry_run
from promptmill.pipelines.spec import JobSpec

spec = JobSpec(**json.loads(sys.argv[1]))
me, peak, store, spilled, stop = psutil.Process(), [0], [0], [0], threading.Event()

def sample():
    state = None
    while not stop.wait(0.2):
        peak[0] = max(peak[0], me.memory_info().rss)
        if ray.is_initialized():
            try:
                state = state or get_state_from_address(ray.get_runtime_context().gcs_address)
                s = get_memory_info_reply(state, timeout_seconds=5).store_stats
                store[0], spilled[0] = max(store[0], s.object_store_bytes_used), s.spilled_bytes_total
            except Exception:
                pass

threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
plan = dry_run(spec)
wall = time.perf_counter() - t
stop.set()
time.sleep(0.3)
print(json.dumps({"wall_s": wall, "driver_peak_rss_mb": peak[0] / 2**20, "store_peak_mb": store[0] / 2**20,
                  "spilled_mb": spilled[0] / 2**20, "plan": plan}))
"""


def measure(spec: dict) -> dict:
    """One dry run's planning in a fresh process (its own embedded Ray): figures and the plan it printed."""
    for _ in range(3):  # a loaded machine's raylet can miss Ray's start-up deadline: that try measured nothing
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                             env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
        if "timed out during startup" not in out.stderr:
            break
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def planning(tmp: Path, rows: list[int], finished: list[int], spec_of, resume_rows: int | None = None) -> list[dict]:
    """Dry runs over `rows`-row inputs (a new output), then over the `resume_rows`-row input (one of `rows`; the
    largest by default) with `finished` samples done."""
    results = []
    for n in rows:
        t = time.perf_counter()
        write_input(tmp / f"in-{n}", n)
        print(f"wrote {n:,} rows in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        r = measure(spec_of(tmp / f"in-{n}", tmp / f"plan-out-{n}"))
        assert r["plan"]["input_rows"] == n and r["plan"]["models"]["gan"]["to_draw"] == n, r["plan"]
        results.append({"case": "new output", "rows": n, "finished": 0, **r})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "plan"}), file=sys.stderr, flush=True)
    n = resume_rows or max(rows)
    assert n in rows, f"--resume-rows {n} must be one of --rows {rows}"
    for k in finished:
        out = tmp / f"resume-{k}"
        spec = spec_of(tmp / f"in-{n}", out)
        write_finished(out, k, "gan", spec)
        r = measure(spec)
        assert r["plan"]["models"]["gan"]["to_draw"] == n - k, r["plan"]
        results.append({"case": "resume", "rows": n, "finished": k, **r})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "plan"}), file=sys.stderr, flush=True)
    return results


def dedup_strategies(folder: Path, rows: int) -> dict[str, float]:
    """Seconds to find the duplicated ids of an input, hash-partitioned groupby (the job's) against a sort-based
    pass (sort by id, then equal neighbours within each sorted block), on one warm embedded Ray."""
    import ray
    from promptmill.pipelines.batch.duplicates import duplicated
    from promptmill.pipelines.batch.read import plan_input, read_ids
    from promptmill.pipelines.batch.validate import ID
    from promptmill.pipelines.spec import InputSpec

    def adjacent(t: pa.Table) -> pa.Table:
        ids = t[ID].combine_chunks()
        same = pc.equal(ids[1:], ids[:-1]) if len(ids) > 1 else pa.array([], pa.bool_())
        return pa.table({ID: pc.unique(ids[1:].filter(same)) if len(ids) > 1 else ids[:0]})

    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    plan = plan_input(InputSpec(path=str(folder), id_column="id"))
    times = {}
    for name, find in (("warm-up", lambda: duplicated(read_ids(plan), rows)),
                       ("hash groupby", lambda: duplicated(read_ids(plan), rows)),
                       ("sort, then neighbours", lambda: read_ids(plan).sort(ID).map_batches(
                           adjacent, batch_format="pyarrow", batch_size=None))):
        t = time.perf_counter()
        assert find().count() == 0
        times[name] = time.perf_counter() - t
    ray.shutdown()
    del times["warm-up"]
    return times
