"""promptmill report RUN_URL: rebuild OUT/report.html from the run's metadata and summary."""

from __future__ import annotations

import argparse

from promptmill.jobs import add_storage_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="rebuild report.html of a finished run")
    p.add_argument("run", help="output URL of a generate job")
    add_storage_options(p, "the run")
    p.add_argument("--review-url", default=None, help="the run's review page (`promptmill review`), linked from the report")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from promptmill.pipelines.runs.report import write_report
    from promptmill.pipelines.runs.results import Run
    from promptmill.pipelines.storage import full_url

    run = Run(args.run, args.storage_options)
    print(full_url(run.fs, write_report(run, args.review_url)))
    return 0
