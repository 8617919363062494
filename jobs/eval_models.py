"""promptmill eval-models: judge accuracy, VQ ceiling and prompt-match of each generator on the test split."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-models", help="measure the shipped models on the shapes test split")
    p.add_argument("--test", default="data/shapes/test", help="shapes test split (promptmill dataset shapes --split test)")
    from promptmill.pipelines.spec import SHIPPED

    for flag, name in (("--judge", "judge"), ("--vq", "vq"), ("--gan", "gan"), ("--transformer", "dalle"), ("--clip", "clip")):
        p.add_argument(flag, default=str(SHIPPED / name))
    p.add_argument("-n", type=int, default=1000, help="test prompts per family")
    p.add_argument("--rerank", default="1,2,4,8", help="best-of-K: the candidates K to measure ('' to skip)")
    p.add_argument("--rerank-n", type=int, default=300, help="best-of-K: test prompts per family (max K each)")
    p.add_argument("--diversity-n", type=int, default=200, help="prompts drawn with 4 seeds for diversity")
    p.add_argument("--grid-dir", default="docs", help="where sample grids go")
    p.add_argument("--sampling", default="{}",
                   help="JSON per family, over each checkpoint's recommended sampling (its config.json `sampling`, "
                   "what a job draws with when its spec sets none) key by key; null turns an optional one off")
    p.set_defaults(func=main)


def load_test_split(url: str, rows: int):
    """The shapes test split (`promptmill dataset shapes --split test`) at any fsspec URL, first `rows` rows."""
    from promptmill.pipelines.model_quality import TestSplit
    from promptmill.pipelines.tables import read_rows

    return TestSplit.from_rows(read_rows(url, TestSplit.COLUMNS, max_rows=rows))


def main(args: argparse.Namespace) -> int:
    from promptmill.models.checkpoint import open_checkpoint
    from promptmill.models.clip_loader import load_clip
    from promptmill.models.families import generator_class
    from promptmill.models.generator import sampling_defaults
    from promptmill.models.judge import load_judge
    from promptmill.pipelines.model_quality import (
        clip_binding,
        eval_best_of,
        eval_generator,
        eval_vq,
        geometry_category,
        grid_png,
        judge_accuracy,
        near_miss_rejection,
        r_precision_split,
        sample_diversity,
        seed_diversity,
    )

    split = load_test_split(args.test, max(args.n, 2000))
    judge = load_judge(args.judge)
    sampling = json.loads(args.sampling)
    report: dict = {"judge_accuracy_real": {k: round(v, 4) for k, v in judge_accuracy(judge, split).items()}}
    print("judge accuracy on real test renders:", json.dumps(report["judge_accuracy_real"]))
    report["near_miss_rejected"] = near_miss_rejection(judge)
    print("near misses rejected (seed 1, by kind):", json.dumps(report["near_miss_rejected"]))
    scorer = load_clip(args.clip) if Path(args.clip).exists() else None
    if scorer is not None:
        report["clip_r_precision"] = r_precision_split(scorer, split, 1000)
        print("clip R-precision (true caption among 100):", json.dumps(report["clip_r_precision"]))
        report["clip_binding"] = clip_binding(scorer, split, 1000)
        print("clip prefers the own caption over one with an attribute swapped between the two objects:",
              json.dumps(report["clip_binding"]))
    if Path(args.vq).exists():
        report["vq"] = eval_vq(args.vq, judge, split, args.n)
        print("vq:", json.dumps(report["vq"]))
    Path(args.grid_dir).mkdir(parents=True, exist_ok=True)
    for family, url in (("gan", args.gan), ("transformer", args.transformer)):
        if not Path(url).exists():
            print(f"{family}: no checkpoint at {url}, skipped")
            continue
        res, errors, imgs, card, geometry = eval_generator(url, judge, split, args.n, **sampling.get(family, {}))
        recommended = sampling_defaults(generator_class(family), open_checkpoint(url, kind=family)[0])
        drawn = {**recommended, **sampling.get(family, {})}
        report[family] = {"prompt_match": res, "attribute_errors": errors, "sampling": drawn,
                          "report_card": card, "geometry": geometry}
        print(f"{family} sampling (the checkpoint's recommendation, then --sampling):", json.dumps(drawn))
        grid_png(imgs[:32], split.captions[:32], f"{args.grid_dir}/samples_{family}.png")
        print(f"{family} prompt-match:", json.dumps(res))
        print(f"{family} attribute error rates:", json.dumps(errors))
        print(f"{family} geometry check, one sample:", json.dumps(geometry))
        report[family]["seed_diversity"] = seed_diversity(url, split.captions[:50], **sampling.get(family, {}))
        print(f"{family} per-pixel std across 8 seeds (first 50 prompts):", report[family]["seed_diversity"])
        report[family]["samples"] = sample_diversity(url, judge, split.captions[:args.diversity_n],
                                                     **sampling.get(family, {}))
        print(f"{family} 4 seeds of the first {args.diversity_n} prompts:", json.dumps(report[family]["samples"]))
        if scorer is not None and args.rerank:
            ks = [int(k) for k in args.rerank.split(",")]
            n = min(args.rerank_n, len(split.captions))
            report[family]["best_of"] = eval_best_of(url, scorer, judge, split.captions[:n],
                                                     [geometry_category(s) for s in split.scenes[:n]], ks,
                                                     **sampling.get(family, {}))
            for chooser, by_k in report[family]["best_of"].items():
                for k, r in by_k.items():
                    print(f"{family} best of {k} by {chooser}:", json.dumps(r))
    print(json.dumps(report))
    print(card_markdown(report))
    print(geometry_markdown(report))
    return 0


def card_markdown(report: dict) -> str:
    """The report card as MODEL_CARD's table: one row per category, one column per family."""
    from promptmill.pipelines.model_quality import CATEGORIES

    fams = [f for f in ("transformer", "gan") if f in report]
    lines = ["| category | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for c in (*CATEGORIES, "judge agrees with geometry"):
        cells = [report[f]["report_card"][c] for f in fams]
        lines.append(f"| {c} | " + " | ".join("–" if x["rate"] is None else f"{x['rate']:.1%} (n={x['n']})"
                                               for x in cells) + " |")
    for key, label, fmt in (("diversity", "seed diversity (judge features, 4 seeds)", "{:.4f}"),
                            ("near_duplicate_rate", "near-duplicate rate (4 seeds)", "{:.1%}")):
        vals = [report[f]["samples"][key] for f in fams]
        lines.append(f"| {label} | " + " | ".join("–" if v is None else fmt.format(v) for v in vals) + " |")
    return "\n".join(lines)


def geometry_markdown(report: dict) -> str:
    """MODEL_CARD's headline table: the geometry check's accuracy per row of issue 38, one sample, then best-of-K."""
    from promptmill.pipelines.model_quality import GEOMETRY_CATEGORIES

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{x:.1%}"

    lines = ["| family | chooser | K | " + " | ".join(GEOMETRY_CATEGORIES) + " | all | strict prompt_match | prompts |",
             "|---|---|---|" + "---|" * (len(GEOMETRY_CATEGORIES) + 3)]
    for f in ("transformer", "gan"):
        if f not in report:
            continue
        rows = [("one sample", 1, report[f]["geometry"], report[f]["prompt_match"]["all"])]
        best = report[f].get("best_of", {})
        first = next(iter(best.values()), {}).get(1)  # K = 1 keeps candidate 0 whatever the chooser
        if first is not None:  # the K columns' own baseline: the same (fewer) prompts
            rows.append((f"one sample, first {first['n']}", 1, first, first["prompt_match"]))
        rows += [(c, k, r, r["prompt_match"]) for c, by_k in best.items() for k, r in by_k.items() if k > 1]
        for chooser, k, r, pm in rows:
            cells = " | ".join(f"{pct(r[c])} (n={r[f'n {c}']})" for c in GEOMETRY_CATEGORIES)
            lines.append(f"| {f} | {chooser} | {k} | {cells} | {pct(r['all'])} | {pct(pm)} | {r['n']} |")
    return "\n".join(lines)
