"""Best-of-K: accuracy against cost for K = 1, 2, 4, 8, both shipped families, each chooser, in one run.

    python benchmarks/rerank.py [--prompts 240] [--timing-prompts 16] [--rounds 3] [--spec examples/demo.yaml]

The models and their sampling are the demo spec's (what `make demo` would draw with). Prompts are shapes test
scenes of a seed nothing else uses, a third each: one object with seen colour-shape pairs, one object with a
held-out pair, two objects. Accuracy is the non-learned geometry check's (`models/shapes/geometry.py`: whole
objects agreeing with every attribute the prompt states), not the judge's. The job's prompt_match includes that
check, so its rows are an upper bound, not an independent figure; the "judge alone" chooser (the judge's
reading and near-miss flag, no geometry) is the independent control, measured here only.

Each prompt's 8 candidates are drawn once (candidate k's seed does not depend on K) and best-of-K keeps, by
`models.rerank.choose` as the job does, the best of the first K. Cost is timed apart, side by side, as the job
spends it per kept image: `generate_best_of` per K and chooser (K = 1: the plain draw) in the demo's batch size,
then the job's scoring of the kept image (`ScoreStage.score`: CLIP, judge, geometry), over the first
`--timing-prompts` prompts, the best of `--rounds` rounds, each in its own shuffled order (a shared machine's load
drifts). Its kept images are checked against those
chosen from the shared draws.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import torch
from promptmill.models import load_generator
from promptmill.models.generator import resolved_sampling
from promptmill.models.rerank import CHOOSERS, Chooser, Scorers, generate_best_of
from promptmill.pipelines.batch.score import ScoreStage, shared_clip, shared_judge
from promptmill.pipelines.model_quality import GEOMETRY_CATEGORIES as CATEGORIES
from promptmill.pipelines.model_quality import balanced_prompts, best_of, draw_candidates, read_candidates
from promptmill.pipelines.spec import load_spec

KS = (1, 2, 4, 8)
SEED = 38  # the benchmark's prompts: a test-split seed no test, eval or training uses


def timed(gen, chooser: Chooser | None, scoring: ScoreStage, caps: list[str], k: int, batch: int,
          **sampling) -> tuple[float, np.ndarray]:
    """(seconds, kept index per prompt) of the job's work for these prompts: draws in calls of `batch` prompts (K
    images each), then the scores of each kept image."""
    t, kept = time.perf_counter(), []
    for i in range(0, len(caps), batch):
        seeds = list(range(i, min(len(caps), i + batch)))
        if chooser is None:
            images, index = gen.generate(caps[i:i + batch], seeds, **sampling), np.zeros(len(seeds), int)
        else:
            best = generate_best_of(gen, chooser, caps[i:i + batch], seeds, k, **sampling)
            images, index = best.images, best.index
        scoring.score(images, caps[i:i + batch])
        kept.append(index)
    return time.perf_counter() - t, np.concatenate(kept)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=240, help="prompts per family (a third per category)")
    ap.add_argument("--timing-prompts", type=int, default=16, help="prompts per timed draw")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds; each configuration's best counts")
    ap.add_argument("--spec", default="examples/demo.yaml", help="the models and sampling measured")
    ap.add_argument("--threads", type=int, default=1, help="torch threads; 1: on a shared machine a team of two "
                    "stalls whenever another process holds a core")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    clip, judge = shared_clip(spec.scoring, "cpu"), shared_judge(spec.scoring, "cpu")
    scoring = ScoreStage(spec.scoring, "cpu")  # the job's scorers (the same CLIP and judge)
    choosers = {"clip_score": CHOOSERS["clip_score"](Scorers(clip, judge)),
                "prompt_match": CHOOSERS["prompt_match"](Scorers(clip, judge))}
    caps, cats = balanced_prompts(args.prompts, SEED)
    cats_a = np.array(cats)
    counts = ", ".join(f"{c}: {cats.count(c)}" for c in CATEGORIES)
    print(f"torch threads={torch.get_num_threads()}  prompts={len(caps)} ({counts})  timed over {args.timing_prompts}")
    rows = []
    for m in spec.models:
        gen, sampling, batch = load_generator(m.checkpoint, "cpu"), m.family_sampling, m.resources.batch_size
        t0 = time.perf_counter()
        cands = draw_candidates(gen, caps, max(KS), batch * 2, **sampling)
        r = read_candidates(cands, caps, clip, judge)
        print(f"{m.name} ({m.family}): {cands.shape[0] * cands.shape[1]} candidates drawn and read in "
              f"{time.perf_counter() - t0:.0f} s; sampling {resolved_sampling(gen, sampling).model_dump()}")
        orders = r.orders()
        # cost: the job's own work per K and chooser, side by side; K = 1 is the plain draw whatever the chooser
        tcaps = caps[:args.timing_prompts]
        runs = [(None, 1), *((name, k) for name in choosers for k in KS[1:])]
        cost: dict[tuple, float] = {}
        mismatched = 0
        for rnd in range(args.rounds):
            for name, k in random.Random(rnd).sample(runs, len(runs)):
                secs, kept = timed(gen, choosers.get(name), scoring, tcaps, k, batch, **sampling)
                cost[(name, k)] = min(secs, cost.get((name, k), secs))
                if name is not None:
                    mismatched += int((kept != best_of(*orders[name], k)[:len(tcaps)]).sum())
        print(f"  timed draws keeping another candidate than the shared draws: {mismatched}")
        for name, (primary, secondary) in orders.items():
            for k in KS:
                idx = best_of(primary, secondary, k)
                ok = r.geometry[np.arange(len(caps)), idx]
                # the control orders by the judge's verdicts too: its cost is prompt_match's
                secs = cost[(None, 1)] if k == 1 else cost.get((name, k), cost[("prompt_match", k)])
                label = "judge alone (control)" if name == "judge alone" else name
                rows.append((m.name, label, k, ok.mean(), *(ok[cats_a == c].mean() for c in CATEGORIES),
                             secs / len(tcaps), secs / cost[(None, 1)]))
    print("\n| model | chooser | K | geometry accuracy | single, in-dist | single, held-out | two objects "
          "| images drawn / kept | s / kept image | cost vs K = 1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ch, k, acc, *per, spk, ratio in rows:
        print(f"| {name} | {ch} | {k} | {acc:.1%} | " + " | ".join(f"{a:.1%}" for a in per)
              + f" | {k} | {spk * 1000:.1f} ms | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
