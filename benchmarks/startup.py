"""A job's fixed cost, itemised: one batch of prompts through `promptmill generate`, as a user runs it.

    python benchmarks/startup.py [--family gan] [--n 64] [--runs 3]

Each run is a fresh process (embedded Ray, shipped checkpoint, default spec, report off). Items, in order, sum
to the wall time: start (interpreter, imports, CLI, until run_job), then summary.json's phases_s (preflight,
ray, read_validate_rejected, first_image: actor start-up up to the first image, images, commit), then exit
(Ray's shutdown and the interpreter's exit, after the result line).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from jobrun import run_generate  # benchmarks/ is the script folder, first on sys.path

from models.shapes import example
from pipelines.batch.job import PHASES

CHECKPOINT = {"gan": "shipped:gan", "transformer": "shipped:dalle"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="gan", choices=sorted(CHECKPOINT))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scoring", action="store_true")
    args = ap.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        prompts = [example(i, 1, "test")[1] for i in range(args.n)]
        pq.write_table(pa.table({"id": [f"p{i}" for i in range(args.n)], "prompt": prompts}), tmp / "in.parquet")
        for k in range(args.runs):
            spec = {"name": "startup", "input": {"path": str(tmp / "in.parquet"), "id_column": "id"},
                    "models": [{"name": "m", "family": args.family, "checkpoint": CHECKPOINT[args.family]}],
                    "scoring": {"enabled": args.scoring}, "output": {"path": str(tmp / f"out{k}"), "report": False}}
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
