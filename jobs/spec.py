"""promptmill spec [--markdown]: every field of the job spec with its type, default and description."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spec", help="the job spec reference (every field, generated from the code)")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (docs/spec.md is this output)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from promptmill.pipelines.spec import reference, reference_markdown

    if args.markdown:
        print(reference_markdown(), end="")
        return 0
    rows = reference()
    width = max(len(r[0]) for r in rows)
    for path, kind, default, desc in rows:
        print(f"{path:<{width}}  {kind} = {default}\n{'':<{width}}  {desc}" if desc else f"{path:<{width}}  {kind} = {default}")
    return 0
