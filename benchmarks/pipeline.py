"""The job against the bare model, both shipped families, measured side by side in one run (issue 17's table).

For each family, on the same shapes test prompts and the shipped checkpoint:
  bare generate   `load_generator(...).generate` in a batched loop, this process, torch's default threads
  bare + score    the same, then the job's scorers (`ScoreStage.score`: CLIP + judge + geometry) back to back
  job             `promptmill generate SPEC` as a user runs it (a fresh process, embedded Ray, PNG files, metadata,
                  commit), scoring off and on, at two sizes: marginal = extra images / extra time from the start
                  of the image phase (actors starting) to the last image (summary.json `phases_s`; the process,
                  Ray and preflight times vary by a second or two between runs and would swamp a 10 s difference),
                  wall = the larger run's images / its wall; start-up = the larger run's wall minus its images at
                  the marginal rate, itemised from `phases_s`.

    python benchmarks/pipeline.py [--gan-n 2048 8192] [--transformer-n 2048 4096] [--batch-size 64]
                                  [--families gan transformer] [--scoring off on]
                                  [--resources JSON] [--scoring-resources JSON] [--no-settle]

Each job starts once creating a file costs its usual CPU (`jobrun.settle_disk`: for about a minute after many
deletions it costs 5-25 times as much on this machine); the table says what it cost at each job's start.

Both sizes are at least 2 x `sizing.MIN_ROWS_PER_ACTOR` prompts: below that the job keeps one actor per pool
(a small job does not pay for a second's start), and a marginal between two sizings would not cancel start-up.
A new output's first ~16k images also make its 4,096 image folders (`layout.image_relpath`), so the GAN's marginal
between small sizes counts folder creation that a long job has behind it: `--families gan --scoring off --gan-n
8192 32768` measures past it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from jobrun import SHIPPED_NAME, one_model_spec, run_generate, write_prompts  # benchmarks/: first on sys.path
from promptmill.models import load_generator
from promptmill.pipelines.batch.job import PHASES
from promptmill.pipelines.batch.score import ScoreStage
from promptmill.pipelines.spec import SHIPPED, ScoringSpec


def bare(family: str, prompts: list[str], batch: int, score: bool = True) -> tuple[float, float]:
    """(generate img/s, generate-then-score img/s), each best of two passes; without `score`, the second is 0."""
    gen = load_generator(str(SHIPPED / SHIPPED_NAME[family]), "cpu")
    scorer = ScoreStage(ScoringSpec()) if score else None
    best_gen, best_both = 0.0, 0.0
    for _ in range(2):
        t = time.perf_counter()
        images = [gen.generate(prompts[i:i + batch], list(range(i, i + len(prompts[i:i + batch]))))
                  for i in range(0, len(prompts), batch)]
        t_gen = time.perf_counter() - t
        best_gen = max(best_gen, len(prompts) / t_gen)
        if scorer is None:
            continue
        t = time.perf_counter()
        for i, imgs in zip(range(0, len(prompts), batch), images):
            scorer.score(np.asarray(imgs), prompts[i:i + batch])
        best_both = max(best_both, len(prompts) / (t_gen + time.perf_counter() - t))
    return best_gen, best_both


# the sizing before issue 17: Ray's one thread for a num_cpus=1 actor, scoring in a pool of its own
BEFORE = {"resources": {"threads": 1}, "scoring": {"pool": True, "resources": {"threads": 1}}}


def job(tmp: Path, family: str, n: int, scoring: bool, batch: int, before: bool = False,
        resources: dict | None = None, scoring_resources: dict | None = None, settle: bool = True
        ) -> tuple[float, dict]:
    """(wall s of `promptmill generate`, its summary.json); `resources` override the model's, `scoring_resources`
    the scoring pool's."""
    variant = "-res" if resources or scoring_resources else ""
    name = f"{family}-{n}-{'scored' if scoring else 'plain'}{'-before' if before else ''}{variant}"
    extra = BEFORE["scoring"] if before else ({"resources": scoring_resources} if scoring_resources else None)
    spec = one_model_spec("bench", tmp / f"in-{n}.parquet", tmp / name, family, scoring,
                          {"batch_size": batch, **(BEFORE["resources"] if before else {}), **(resources or {})},
                          scoring_extra=extra)
    wall, summary = run_generate(tmp, name, spec, settle=settle)
    assert summary["images_total"] == {"m": n}, summary["images_total"]
    return wall, summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gan-n", type=int, nargs=2, default=[2048, 8192])
    ap.add_argument("--transformer-n", type=int, nargs=2, default=[2048, 4096])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--families", nargs="+", default=["gan", "transformer"], choices=["gan", "transformer"])
    ap.add_argument("--scoring", nargs="+", default=["off", "on"], choices=["off", "on"])
    ap.add_argument("--resources", type=json.loads, default=None,
                    help='also run each job with these model resources (JSON), beside the default: '
                    '\'{"actors": 2, "max_actors": 2, "threads": 1}\'')
    ap.add_argument("--scoring-resources", type=json.loads, default=None,
                    help="the variant's scoring pool resources (JSON), with or without --resources")
    ap.add_argument("--no-settle", dest="settle", action="store_false",
                    help="start each job at once, not when file creation costs its usual CPU (jobrun.settle_disk)")
    ap.add_argument("--before", action="store_true", help="also run the larger size with the sizing before issue 17 "
                    "(one torch thread per actor, a scoring pool of its own)")
    args = ap.parse_args()
    rows, startups, befores = [], [], []
    variant = {k: v for k, v in (("resources", args.resources), ("scoring", args.scoring_resources)) if v}
    variants = [("default", {})] + ([(json.dumps(variant), variant)] if variant else [])
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sizes = {"gan": args.gan_n, "transformer": args.transformer_n}
        for family in args.families:
            n1, n2 = sizes[family]
            prompts = [write_prompts(tmp / f"in-{n}.parquet", n) for n in (n1, n2)][1]
            g, gs = bare(family, prompts[:min(n1, 2048)], args.batch_size, score="on" in args.scoring)
            for scoring, base in ((False, g), (True, gs)):
                if ("on" if scoring else "off") not in args.scoring:
                    continue
                for label, res in variants:
                    job_args = {"resources": res.get("resources"), "scoring_resources": res.get("scoring"),
                                "settle": args.settle}
                    w1, s1 = job(tmp, family, n1, scoring, args.batch_size, **job_args)
                    w2, summary = job(tmp, family, n2, scoring, args.batch_size, **job_args)
                    drawing = [s["phases_s"]["first_image"] + s["phases_s"]["images"] for s in (s1, summary)]
                    marginal = (n2 - n1) / (drawing[1] - drawing[0])
                    startup = w2 - n2 / marginal
                    created = "/".join(f"{s['file_create_ms']:.2f}" for s in (s1, summary))
                    rows.append((family, "on" if scoring else "off", label, base, marginal, n2 / w2, startup, created))
                    outside = w2 - summary["wall_s"]  # process start, imports, CLI, Ray shutdown at exit
                    startups.append((family, "on" if scoring else "off", label, outside, summary["phases_s"]))
                    if label == "default":
                        default = {"wall": w2, "drawing": drawing[1]}
                if args.before:  # against the default spec's larger run
                    wb, sb = job(tmp, family, n2, scoring, args.batch_size, before=True, settle=args.settle)
                    drawing_b = sb["phases_s"]["first_image"] + sb["phases_s"]["images"]
                    befores.append((family, "on" if scoring else "off", n2 / wb, n2 / default["wall"], drawing_b,
                                    default["drawing"]))
    print(f"img/s on this machine, batch {args.batch_size}; gan n = {args.gan_n}, transformer n = {args.transformer_n}")
    print("| family | scoring | resources | bare (generate, + score back to back) | job, marginal | job, wall | "
          "marginal / bare | wall / bare | fixed start-up s | file create ms at each job's start |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for family, scoring, label, base, marginal, wall, startup, created in rows:
        print(f"| {family} | {scoring} | {label} | {base:.1f} | {marginal:.1f} | {wall:.1f} | {marginal / base:.2f} | "
              f"{wall / base:.2f} | {startup:.1f} | {created} |")
    if befores:
        print("\nwhat issue 17's sizing bought (larger size, same run): before = 1 torch thread per actor and a "
              "scoring pool of its own; after = threads from the machine, scoring in the generator actor")
        print("| family | scoring | wall img/s before | after | after / before | drawing s before | after |")
        print("|---|---|---|---|---|---|---|")
        for family, scoring, wb, wa, db, da in befores:
            print(f"| {family} | {scoring} | {wb:.1f} | {wa:.1f} | {wa / wb:.2f} | {db:.1f} | {da:.1f} |")
    print("\nwhere the larger run's time went (s): outside run_job = process start, imports, Ray shutdown; then "
          "summary.json phases_s")
    for family, scoring, label, outside, phases in startups:
        items = ", ".join(f"{k} {phases[k]:.1f}" for k in PHASES if k in phases)
        print(f"- {family}, scoring {scoring}, {label}: outside run_job {outside:.1f}; {items}")


if __name__ == "__main__":
    main()
