"""One sample per prompt, no rerank: how each sampling setting trades the geometry check's accuracy for seed variety.

    python benchmarks/sampling.py --family transformer [--checkpoint models/checkpoints/dalle] [--prompts 240]
        [--grid '{"temperature": [1.0, 0.8], "top_k": [null, 64, 16], "guidance_scale": [1, 2, 3]}']

Prompts are shapes test scenes of a validation seed (39) that neither `make eval` (the test split, seed 0) nor
`benchmarks/rerank.py` (seed 38) uses, a third per issue-38 row: one object with a colour-shape pair seen in
training, one with a held-out pair, two objects. Settings are chosen here and confirmed on `make eval`'s prompts,
so the card's figures are not the ones the choice was made on. Per setting: the geometry check's accuracy per row
(non-learned, `models/shapes/geometry.py`), seed variety on the first `--diversity-prompts` prompts x 4 seeds in
the judge's feature space (mean cosine distance and the near-duplicate share, as `make eval` measures them), and
the time per image.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from promptmill.models import load_generator
from promptmill.models.generator import resolved_sampling
from promptmill.models.images import to_nchw
from promptmill.models.judge import judge_prompts, load_judge
from promptmill.pipelines.model_quality import (
    GEOMETRY_CATEGORIES,
    balanced_prompts,
    draw_candidates,
    geometry_breakdown,
    geometry_passes,
    sample_diversity,
)
from promptmill.pipelines.spec import SHIPPED

SEED = 39  # validation prompts: no test, eval, benchmark or training uses this seed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", choices=["transformer", "gan"], required=True)
    ap.add_argument("--checkpoint", help="default: the shipped one of the family")
    ap.add_argument("--prompts", type=int, default=240)
    ap.add_argument("--diversity-prompts", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--grid", help="JSON: sampling field -> values; every combination is measured, each over the "
                    "checkpoint's recommended sampling (config.json), where null turns an optional one off")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    default = {"transformer": {"temperature": [1.0, 0.8], "top_k": [None, 64, 16], "guidance_scale": [1, 2, 3]},
               "gan": {"truncation": [None, 2.0, 1.5, 1.0]}}[args.family]
    grid = json.loads(args.grid) if args.grid else default
    url = args.checkpoint or str(SHIPPED / {"transformer": "dalle", "gan": "gan"}[args.family])
    gen, judge = load_generator(url, "cpu"), load_judge(str(SHIPPED / "judge"))
    caps, cats = balanced_prompts(args.prompts, SEED)
    print(f"{url}: {len(caps)} prompts (seed {SEED}), diversity on {args.diversity_prompts} x 4 seeds")
    print("\n| sampling | " + " | ".join(GEOMETRY_CATEGORIES) + " | all | seed diversity | near-duplicates | ms / image |")
    print("|---|" + "---|" * (len(GEOMETRY_CATEGORIES) + 4))
    for values in itertools.product(*grid.values()):
        sampling = dict(zip(grid, values))  # over the checkpoint's recommended sampling; null: that setting off
        t = time.perf_counter()
        imgs = draw_candidates(gen, caps, 1, args.batch, **sampling)[:, 0]  # one sample: prompt i's seed is i
        ms = (time.perf_counter() - t) / len(caps) * 1000
        verdicts = judge_prompts(judge, to_nchw(imgs), caps)
        r = geometry_breakdown(geometry_passes(caps, verdicts), cats)
        d = sample_diversity(url, judge, caps[:args.diversity_prompts], **sampling)
        drawn = resolved_sampling(gen, sampling).model_dump(exclude={"use_cache"})  # with the recommendation
        print(f"| {json.dumps(drawn)} | " + " | ".join(f"{r[c]:.1%}" for c in GEOMETRY_CATEGORIES)
              + f" | {r['all']:.1%} | {d['diversity']:.4f} | {d['near_duplicate_rate']:.0%} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
