"""torch threads in a Ray Data pool actor: set where the stage is built vs on the thread that calls it.

    python benchmarks/actor_threads.py [--family transformer] [--n 1024] [--rounds 2]

One local Ray (a CPU more than the cores, for the read tasks), one pool actor (num_cpus = the machine's cores,
so Ray sets OMP_NUM_THREADS to them), the shipped checkpoint, batch 64; each variant runs `rounds` times,
alternating. Reported: img/s inside the stage's `generate` calls (the first call dropped), and the stage thread's
voluntary context switches per call: libgomp's worker threads sleeping between parallel regions instead of
spinning (pipelines/batch/threads.py).

- `ray`: what Ray alone does (OMP_NUM_THREADS = num_cpus in the actor's environment)
- `built`: torch.set_num_threads in the constructor (promptmill before this benchmark)
- `on call`: `ActorThreads`: one thread while building, the count set on the calling thread
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
import ray
import torch
from jobrun import SHIPPED_NAME  # benchmarks/ is the script folder, first on sys.path
from promptmill.models import load_generator
from promptmill.models.shapes.scenes import example
from promptmill.pipelines.batch.threads import ActorThreads
from promptmill.pipelines.spec import SHIPPED


def _switches() -> int:
    with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
        return int(f.read().split("voluntary_ctxt_switches:")[1].split()[0])


class Stage:
    def __init__(self, variant: str, family: str, threads: int) -> None:
        self.threads = ActorThreads(threads if variant == "on call" else None)
        if variant == "built":
            torch.set_num_threads(threads)
        self.gen = load_generator(str(SHIPPED / SHIPPED_NAME[family]), "cpu")
        self.gen.generate(["a red circle"] * 8, list(range(8)))  # warm-up, on the building thread

    def __call__(self, batch: dict) -> dict:
        self.threads.on_call()
        ids = [int(i) for i in batch["id"]]
        prompts = [example(i, 1, "test")[1] for i in ids]
        s, t = _switches(), time.perf_counter()
        self.gen.generate(prompts, ids)
        n = len(ids)
        batch["seconds"], batch["switches"] = np.full(n, time.perf_counter() - t), np.full(n, _switches() - s)
        batch["threads"] = np.full(n, torch.get_num_threads())
        return batch


def run(variant: str, family: str, n: int, cores: int) -> tuple[float, float, int]:
    rows = ray.data.range(n, override_num_blocks=n // 64).map_batches(
        Stage, fn_constructor_args=(variant, family, cores), compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=64, num_cpus=cores).take_all()
    calls = sorted({(r["seconds"], r["switches"], r["threads"]) for r in rows})
    calls = calls[1:] if len(calls) > 1 else calls
    seconds = sum(c[0] for c in calls)
    return 64 * len(calls) / seconds, float(np.mean([c[1] for c in calls])), int(calls[0][2])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="transformer", choices=sorted(SHIPPED_NAME))
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    ray.init(address="local", num_cpus=cores + 1, include_dashboard=False, log_to_driver=False)
    results: dict[str, list[tuple[float, float, int]]] = {}
    for _ in range(args.rounds):
        for variant in ("ray", "built", "on call"):
            results.setdefault(variant, []).append(run(variant, args.family, args.n, cores))
    base = np.mean([r[0] for r in results["built"]])
    print(f"{args.family}, {args.n} prompts, batch 64, one actor with num_cpus={cores}, {args.rounds} rounds\n")
    print("| variant | torch threads in the call | img/s per call (each round) | vs built | voluntary switches per call |")
    print("|---|---|---|---|---|")
    for variant, rs in results.items():
        rates = " / ".join(f"{r[0]:.1f}" for r in rs)
        print(f"| {variant} | {rs[0][2]} | {rates} | {np.mean([r[0] for r in rs]) / base:.2f} | "
              f"{np.mean([r[1] for r in rs]):,.0f} |")


if __name__ == "__main__":
    main()
