"""Where a job's CPU goes: CPU seconds per process kind (driver, generator actor, write tasks, Ray's own), sampled
from /proc every 0.5 s while `promptmill generate` runs one job (shipped checkpoint, scoring off by default).

    python benchmarks/cpu_split.py [--family gan] [--n 8192] [--scoring] [--concurrent-calls N] [--write-in tasks]
                                     [--actors N] [--threads N]

Worker processes are named by what they run at the sample (`ray::IDLE` between tasks): Ray Data's small tasks
(expand, repartition, write) mostly show as IDLE. The 2-core machine has 2 CPU-s per wall second to share.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import psutil
from jobrun import SHIPPED_NAME, one_model_spec, run_generate, write_prompts  # benchmarks/: first on sys.path
from promptmill.pipelines.batch.job import PHASES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="gan", choices=sorted(SHIPPED_NAME))
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--scoring", action="store_true")
    ap.add_argument("--concurrent-calls", type=int, default=None, help="resources.concurrent_calls (default: the spec's)")
    ap.add_argument("--write-in", choices=["actors", "tasks"], default=None, help="output.write_in (default: auto)")
    ap.add_argument("--actors", type=int, default=None, help="resources.actors = max_actors (default: the spec's)")
    ap.add_argument("--threads", type=int, default=None, help="resources.threads (default: the spec's)")
    args = ap.parse_args()
    before = {p.pid for p in psutil.process_iter()}
    seen: dict[int, tuple[str, float]] = {}

    def watch(driver: psutil.Process, _: float) -> None:
        for p in psutil.process_iter():
            if p.pid in before and p.pid != driver.pid:
                continue
            try:
                cmd = p.cmdline()
                kind = "driver" if p.pid == driver.pid else (cmd[0].split()[0] if cmd and cmd[0].startswith("ray::")
                                                            else p.name())
                seen[p.pid] = (kind, sum(p.cpu_times()[:2]))
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write_prompts(tmp / "in.parquet", args.n)
        spec = one_model_spec("cpu", tmp / "in.parquet", tmp / "out", args.family, args.scoring,
                              {"batch_size": args.batch_size,
                               **({"concurrent_calls": args.concurrent_calls} if args.concurrent_calls else {}),
                               **({"actors": args.actors, "max_actors": args.actors} if args.actors else {}),
                               **({"threads": args.threads} if args.threads else {})})
        if args.write_in:
            spec["output"]["write_in"] = args.write_in
        wall, summary = run_generate(tmp, "cpu", spec, watch, every_s=0.5)
    by_kind: dict[str, float] = {}
    for kind, cpu in seen.values():
        by_kind[kind] = by_kind.get(kind, 0.0) + cpu
    phases = summary["phases_s"]
    print(f"{args.family}, {args.n} prompts, scoring {'on' if args.scoring else 'off'}: wall {wall:.1f} s, "
          f"{args.n / phases['images']:.0f} img/s over the images phase; file create "
          f"{summary['file_create_ms']:.2f} ms at its start; phases " +
          ", ".join(f"{k} {phases[k]:.1f}" for k in PHASES if k in phases))
    print("| process | CPU s | share |\n|---|---|---|")
    total = sum(by_kind.values())
    for kind, cpu in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        if cpu >= 0.3:
            print(f"| {kind} | {cpu:.1f} | {cpu / total:.0%} |")
    print(f"| all | {total:.1f} | over {wall:.1f} s wall on {psutil.cpu_count()} cores |")


if __name__ == "__main__":
    main()
