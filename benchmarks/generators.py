"""Generator throughput on this machine, measured side by side in one run:

  images/s of each family at batch 1 and batch 64; the Transformer with vs without KV cache; model FLOPs
  utilisation (FLOPs counted by torch's FlopCounterMode / wall time) against a GEMM peak measured here.

    python benchmarks/generators.py [--gan models/checkpoints/gan] [--transformer models/checkpoints/dalle] [--guidance 3]

Issue 3 names this file benchmarks/models.py; run as a script, that name would shadow the `models` package.
"""

from __future__ import annotations

import argparse
import time

import torch
from promptmill.models import load_generator
from promptmill.models.shapes.scenes import example
from torch.utils.flop_counter import FlopCounterMode


def gemm_peak(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def measure(gen, prompts: list[str], batch: int, reps: int, **sampling) -> tuple[float, float]:
    """(images/s, FLOPs per image) at `batch`; best of `reps` timed calls after one warm-up."""
    p, seeds = prompts[:batch], list(range(batch))
    with FlopCounterMode(display=False) as fc:
        gen.generate(p, seeds, **sampling)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        gen.generate(p, seeds, **sampling)
        best = min(best, time.perf_counter() - t)
    return batch / best, fc.get_total_flops() / batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gan", default="models/checkpoints/gan")
    ap.add_argument("--transformer", default="models/checkpoints/dalle")
    ap.add_argument("--guidance", type=float, default=3.0)
    args = ap.parse_args()
    prompts = [example(i, 2, "test")[1] for i in range(64)]
    peak = gemm_peak()
    print(f"torch threads={torch.get_num_threads()}  measured fp32 GEMM peak: {peak / 1e9:.1f} GFLOP/s")
    rows = []
    gan = load_generator(args.gan, "cpu")
    for b in (1, 64):
        rows.append(("gan", b, "", *measure(gan, prompts, b, 5)))
    tf = load_generator(args.transformer, "cpu")
    for b in (1, 64):
        for cache in (True, False):
            s = {"guidance_scale": args.guidance, "use_cache": cache}
            rows.append(("transformer", b, f"guidance={args.guidance} cache={'on' if cache else 'off'}",
                         *measure(tf, prompts, b, 2, **s)))
    print(f"{'family':12} {'batch':>5} {'img/s':>9} {'GFLOP/img':>10} {'MFU':>6}  settings")
    for fam, b, note, ips, flops in rows:
        print(f"{fam:12} {b:5d} {ips:9.1f} {flops / 1e9:10.3f} {ips * flops / peak:6.1%}  {note}")
    tf64 = {r[3] for r in rows if r[0] == "transformer" and r[1] == 64 and "cache=on" in r[2]}.pop()
    tf64_nc = {r[3] for r in rows if r[0] == "transformer" and r[1] == 64 and "cache=off" in r[2]}.pop()
    print(f"KV cache speed-up at batch 64: {tf64 / tf64_nc:.2f}x")


if __name__ == "__main__":
    main()
