"""What the driver holds while images stream: its RSS beside the object references it owns (blocks queued between
operators are owned by the driver, which submitted the tasks that made them), every `--every-s` seconds.

    python benchmarks/driver_memory.py [--n 30000] [--scoring off] [--every-s 10]

The job runs in this process (`run_job`, embedded Ray, shipped GAN, scoring on by default), so that the sampler
can ask the driver's core worker for its reference table; that is the only difference from `promptmill generate`.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
from jobrun import one_model_spec, write_prompts
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.spec import JobSpec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=30_000)
    ap.add_argument("--scoring", choices=["on", "off"], default="on")
    ap.add_argument("--every-s", type=float, default=10)
    args = ap.parse_args()
    me, rows, stop = psutil.Process(), [], threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.wait(args.every_s):
            if ray.is_initialized():
                refs = len(ray._private.worker.global_worker.core_worker.get_all_reference_counts())
                rows.append((time.perf_counter() - t0, me.memory_info().rss / 2**20, refs))

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write_prompts(tmp / "in.parquet", args.n, distinct=2000)
        spec = JobSpec(**one_model_spec("driver", tmp / "in.parquet", tmp / "out", "gan", args.scoring == "on"))
        threading.Thread(target=sample, daemon=True).start()
        result = run_job(spec)
        stop.set()
    ph = result.summary["phases_s"]
    print(f"gan, {args.n} prompts, scoring {args.scoring}: images phase {ph['images']:.0f} s, "
          f"{result.summary['images_per_s']:.0f} img/s over the job's wall\n")
    print("| s | driver RSS MB | references the driver owns |")
    print("|---|---|---|")
    for s, rss, refs in rows:
        print(f"| {s:.0f} | {rss:.0f} | {refs} |")


if __name__ == "__main__":
    main()
