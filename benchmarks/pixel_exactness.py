"""Do the shipped generators draw the same pixels at any batch size and torch thread count? (issue 33, item 11)

Each family draws the same prompts and seeds at batch sizes 1, 7 and 64 and with 1 and 2 torch threads (what an
actor's share of the cores and its batches vary with), and every image is compared with the batch-1, one-thread
draw: images that differ, pixels that differ, and the largest difference in 1/255 steps.

    python benchmarks/pixel_exactness.py [--n 128]
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
from jobrun import SHIPPED_NAME  # benchmarks/: first on sys.path
from promptmill.models import load_generator
from promptmill.models.shapes.scenes import example
from promptmill.pipelines.spec import SHIPPED


def draw(gen, prompts: list[str], seeds: list[int], batch: int, threads: int) -> np.ndarray:
    torch.set_num_threads(threads)
    return np.concatenate([gen.generate(prompts[i:i + batch], seeds[i:i + batch])
                           for i in range(0, len(prompts), batch)]).astype(int)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    args = ap.parse_args()
    prompts = [example(i, 0, "test")[1] for i in range(args.n)]
    seeds = [1_000_003 * i + 7 for i in range(args.n)]
    print(f"{'family':<12}{'batch':>6}{'threads':>8}{'images differ':>16}{'pixels differ':>15}{'max diff':>10}")
    for family, name in sorted(SHIPPED_NAME.items()):
        gen = load_generator(str(SHIPPED / name), "cpu")
        ref = draw(gen, prompts, seeds, 1, 1)
        for batch, threads in itertools.product((1, 7, 64), (1, 2)):
            got = draw(gen, prompts, seeds, batch, threads)
            diff = np.abs(got - ref)
            print(f"{family:<12}{batch:>6}{threads:>8}{int((diff.reshape(len(diff), -1).max(1) > 0).sum()):>10} / "
                  f"{args.n:<3}{int((diff.max(-1) > 0).sum()):>15}{int(diff.max()):>10}")


if __name__ == "__main__":
    main()
