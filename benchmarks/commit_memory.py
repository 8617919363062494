"""The commit's memory against the run's size: peak RSS of `commit()` alone over N staged metadata rows, each size
in a fresh process (torch and the judge's module imported first, as in the driver that commits).

Rows are synthetic but sized like a scored run's (128 judge features, a ~570-character geometry JSON, the other
columns filled), in 64-row staged parts as the job's write stage leaves them, 4 samples per prompt.

    python benchmarks/commit_memory.py [--sizes 1000 10000 100000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

CHILD = r"""
import sys, tempfile, threading, time
import numpy as np, psutil, pyarrow as pa, pyarrow.parquet as pq, fsspec
import torch, promptmill.models.judge  # noqa: F401 - the driver has them loaded before it commits
import promptmill.pipelines.batch.commit as c
from promptmill.pipelines.layout import METADATA_SCHEMA

n, root = int(sys.argv[1]), tempfile.mkdtemp()
fsspec.filesystem("file").makedirs(f"{root}/_staging/metadata")
rng = np.random.default_rng(0)
geometry = '{"background": "gray", "objects": [' + ", ".join(['{"area": 66.9, "color": "black", "fits": {}}'] * 12) + "]}"
for start in range(0, n, 64):
    k = min(64, n - start)
    cols = {f.name: [None] * k for f in METADATA_SCHEMA}
    cols.update(id=[f"p{(start + i) // 4}" for i in range(k)], sample=[(start + i) % 4 for i in range(k)],
                model=["gan"] * k, prompt=["a small red circle left of a large blue square"] * k,
                image_path=[f"/runs/out/images/gan/abc/p{start + i}.png" for i in range(k)], geometry=[geometry] * k,
                sampling=['{"candidates": 1}'] * k, node=["n" * 56] * k, sha256=["f" * 64] * k, clip_score=[0.5] * k,
                judge_features=list(rng.normal(size=(k, 128)).astype(np.float32)))
    pq.write_table(pa.table(cols, schema=METADATA_SCHEMA), f"{root}/_staging/metadata/part-{start:09d}.parquet")
me = psutil.Process()
start_rss = peak = me.memory_info().rss
def sample():
    global peak
    while True:
        peak = max(peak, me.memory_info().rss)
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
rows = len(c.commit(fsspec.filesystem("file"), root, ("judge_features", 0.1)))
print(n, rows, round(time.perf_counter() - t, 2), round(start_rss / 2**20), round(peak / 2**20))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    args = ap.parse_args()
    print("| staged rows | commit s | RSS before MB | peak MB | peak - before MB |\n|---|---|---|---|---|")
    for n in args.sizes:
        out = subprocess.run([sys.executable, "-c", CHILD, str(n)], capture_output=True, text=True, check=True)
        size, rows, secs, before, peak = out.stdout.split()
        assert int(rows) == n, out.stdout
        print(f"| {int(size):,} | {secs} | {before} | {peak} | +{int(peak) - int(before)} |")


if __name__ == "__main__":
    main()
