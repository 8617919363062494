"""A job's fixed cost, itemised: one batch of prompts through `promptmill generate`, as a user runs it.

    python benchmarks/startup.py [--family gan] [--n 64] [--runs 3] [--resources JSON]

Each run is a fresh process (embedded Ray, shipped checkpoint, default spec, report off). Items, in order, sum
to the wall time: start (interpreter, imports, CLI, until run_job), then summary.json's phases_s (preflight,
ray, read_validate_rejected, first_image: actor start-up up to the first image, images, commit), then exit
(Ray's shutdown and the interpreter's exit, after the result line).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from jobrun import SHIPPED_NAME, one_model_spec, run_generate, write_prompts  # benchmarks/: first on sys.path
from promptmill.pipelines.batch.job import PHASES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="gan", choices=sorted(SHIPPED_NAME))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scoring", action="store_true")
    ap.add_argument("--resources", type=json.loads, default=None, help='the model\'s resources, JSON: \'{"actors": 2}\'')
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        write_prompts(tmp / "in.parquet", args.n)
        for k in range(args.runs):
            spec = one_model_spec("startup", tmp / "in.parquet", tmp / f"out{k}", args.family, args.scoring,
                                  args.resources)
            wall, summary = run_generate(tmp, f"startup{k}", spec)
            items = {"start": summary["outside_s"]["start"], **summary["phases_s"],
                     "exit": summary["outside_s"]["exit"], "wall": wall}
            runs.append(items)
    names = ["start", *PHASES, "exit", "wall"]
    print(f"{args.family}, {args.n} prompts, scoring {'on' if args.scoring else 'off'}, {args.runs} fresh processes "
          "(s; median, then each run)\n")
    print("| item | median | runs |")
    print("|---|---|---|")
    for name in names:
        values = [r[name] for r in runs if name in r]
        print(f"| {name} | {statistics.median(values):.2f} | {' / '.join(f'{v:.2f}' for v in values)} |")


if __name__ == "__main__":
    main()
