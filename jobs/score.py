"""promptmill score INPUT --out OUT: the job's scoring stage over any image-caption Parquet (local or any URL)."""

from __future__ import annotations

import argparse

from promptmill.jobs import add_storage_options


def add_parser(sub: argparse._SubParsersAction) -> None:
    from promptmill.pipelines.spec import SHIPPED

    p = sub.add_parser("score", help="score an existing image-caption table (clip_score, judged, geometry, "
                       "prompt_match), exactly once and resumable")
    p.add_argument("input", help="Parquet file, directory, glob or fsspec URL")
    p.add_argument("--out", required=True, help="output directory: one scored part per input file")
    p.add_argument("--image-column", default="png", help="encoded image bytes")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--clip", default=str(SHIPPED / "clip"), help="our CLIP or a Hugging Face CLIP directory; '' for none")
    p.add_argument("--judge", default=str(SHIPPED / "judge"), help="judge checkpoint; '' for none")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--actors", type=int, default=None, help="scoring actors (default: one, or on this machine "
                   "alone one single-threaded actor per core as the work allows)")
    add_storage_options(p, "input, output and checkpoints")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from promptmill.jobs import error
    from promptmill.pipelines.batch.lease import LeaseHeld
    from promptmill.pipelines.batch.preflight import PreflightError
    from promptmill.pipelines.batch.score_table import score_table
    from promptmill.pipelines.spec import Resources, ScoringSpec
    from promptmill.pipelines.tables import InputError
    from pydantic import ValidationError

    try:
        so = args.storage_options
        scoring = ScoringSpec(clip=args.clip or None, judge=args.judge or None, storage_options=so,
                              resources=Resources(batch_size=args.batch_size,
                                                  **({"actors": args.actors, "max_actors": args.actors}
                                                     if args.actors is not None else {})))
        summary = score_table(args.input, args.out, args.image_column, args.caption_column, scoring, so, so)
    except (ValueError, ValidationError, InputError, PreflightError, LeaseHeld) as e:
        return error(e)
    match = "-" if summary["prompt_match"] is None else f"{summary['prompt_match']:.1%} of {summary['prompt_match_n']}"
    print(f"scored {summary['scored']} of {summary['rows']} rows ({summary['score_errors']} errors; prompt_match "
          f"{match}); {summary['files_skipped_as_done']} of {summary['files']} files were already done -> {args.out}")
    return 0
