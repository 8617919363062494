"""Pipeline overhead, measured side by side in one run on the same prompts and checkpoint:

  (a) seed-style loop: one prompt per generate call, each image encoded and saved as it comes
  (b) the bare model in a batched loop (no encoding, no I/O)
  (c) the full generate job (embedded Ray, validation, actor pool, PNG files, metadata, commit) to local disk,
      scoring off (as the job ran before the scoring stage existed)
  (d) the same job with the scoring stage on (CLIP + judge actor pool; report written)

    python benchmarks/pipeline.py [--checkpoint models/checkpoints/gan] [--family gan] [-n 1024] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from models import load_generator
from models.shapes import example
from pipelines.batch.job import run_job
from pipelines.layout import encode_image
from pipelines.spec import load_spec


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint", default="models/checkpoints/gan")
    ap.add_argument("--family", default="gan")
    ap.add_argument("-n", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    prompts = [example(i, 1, "test")[1] for i in range(args.n)]
    seeds = list(range(args.n))
    gen = load_generator(args.checkpoint, "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        for i, (p, s) in enumerate(zip(prompts, seeds)):
            Path(tmp, f"a{i}.png").write_bytes(encode_image(gen.generate([p], [s])[0], "png"))
        a = args.n / (time.perf_counter() - t)

        t = time.perf_counter()
        for i in range(0, args.n, args.batch_size):
            gen.generate(prompts[i:i + args.batch_size], seeds[i:i + args.batch_size])
        b = args.n / (time.perf_counter() - t)

        pq.write_table(pa.table({"id": [f"b{i}" for i in range(args.n)], "prompt": prompts}), f"{tmp}/in.parquet")

        def job(out: str, scoring: bool) -> float:
            spec = load_spec({"name": "bench", "input": {"path": f"{tmp}/in.parquet", "id_column": "id"},
                              "models": [{"name": "m", "family": args.family, "checkpoint": args.checkpoint,
                                          "resources": {"batch_size": args.batch_size}}],
                              "scoring": {"enabled": scoring}, "output": {"path": f"{tmp}/{out}", "report": scoring}})
            t = time.perf_counter()
            res = run_job(spec)
            assert res.images_written == {"m": args.n}
            return args.n / (time.perf_counter() - t)

        import ray

        # start-up excluded, as for (a) and (b); logical CPUs as the job's own embedded Ray would size them for (d)
        # (generator + scoring pools + read/write), or its capacity check refuses the job on a 2-core machine
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4), include_dashboard=False, log_to_driver=False)
        c = job("plain", False)
        d = job("scored", True)
    print(f"images={args.n} family={args.family} batch={args.batch_size} checkpoint={args.checkpoint}")
    print(f"(a) seed-style loop, 1 prompt/call + save : {a:8.1f} img/s")
    print(f"(b) bare model, batched                    : {b:8.1f} img/s")
    print(f"(c) full job to local disk                 : {c:8.1f} img/s")
    print(f"(d) full job + scoring stage + report      : {d:8.1f} img/s")
    print(f"(c)/(b) = {c / b:.2f}   (c)/(a) = {c / a:.2f}   (d)/(c) = {d / c:.2f}")


if __name__ == "__main__":
    main()
