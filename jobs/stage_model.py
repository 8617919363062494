"""promptmill stage-model SRC DST [--load]: copy a model directory (a diffusers pipeline, a Hugging Face CLIP, or
one of our checkpoints) to object storage, then check the copy: every file there with its size, and the layout
its loader needs (`--load` also loads it from DST on this machine's CPU)."""

from __future__ import annotations

import argparse
import logging

from promptmill.jobs import add_storage_options, error


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stage-model", help="copy a local model directory to storage and check it loads from there")
    p.add_argument("src", help="local model directory")
    p.add_argument("dst", help="destination URL, e.g. s3://bucket/models/sd-turbo/")
    add_storage_options(p, "DST")
    # the old spelling, one KEY=VALUE per flag: kept for a release, merged under --storage-options
    p.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE", help=argparse.SUPPRESS)
    p.add_argument("--load", action="store_true", help="also load the model from DST (CPU; slow for big models)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from promptmill.models import CheckpointError
    from promptmill.pipelines.model_upload import stage_model
    from promptmill.pipelines.spec import SpecError, parse_overrides

    try:
        options = args.storage_options
        if args.storage_option:
            logging.getLogger("promptmill").warning("--storage-option KEY=VALUE is deprecated: use --storage-options JSON")
            options = {**dict(parse_overrides(args.storage_option, "--storage-option")), **options}
        line = stage_model(args.src, args.dst, options, args.load)
    except (CheckpointError, SpecError, OSError) as e:
        return error(e)
    print(line)
    return 0
