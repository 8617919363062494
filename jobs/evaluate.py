"""promptmill evaluate RUN_URL --reference URL: FID / KID / IS / precision-recall per model, into summary.json."""

from __future__ import annotations

import argparse

from promptmill.jobs import add_storage_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    from promptmill.pipelines.spec import SHIPPED

    p = sub.add_parser("evaluate", help="job-level metrics of a finished run against a reference image set")
    p.add_argument("run", help="output URL of a generate job")
    p.add_argument("--reference", required=True, help="image-caption Parquet (e.g. data/shapes/test)")
    p.add_argument("--judge", default=str(SHIPPED / "judge"), help="feature extractor checkpoint ('' for none: "
                   "then --clip's image embeddings)")
    p.add_argument("--clip", default=None, help="a CLIP (ours or a Hugging Face directory) whose image embeddings "
                   "are the feature space when --judge is ''")
    p.add_argument("--max-images", type=int, default=2000, help="images per model (reference: twice that)")
    p.add_argument("--image-column", default="png")
    add_storage_options(p, "the run and the reference")
    p.add_argument("--no-report", action="store_true", help="do not rebuild report.html")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from promptmill.pipelines.runs.metrics import table
    from promptmill.pipelines.runs.reference import evaluate_run
    from promptmill.pipelines.runs.report import write_report
    from promptmill.pipelines.runs.results import Run

    so = args.storage_options
    run = Run(args.run, so)
    metrics = evaluate_run(run, args.reference, args.judge or None, max_images=args.max_images,
                           reference_storage_options=so, image_column=args.image_column, clip_url=args.clip)
    print(table(metrics["models"]))
    if not args.no_report:
        write_report(run)
    return 0
