"""promptmill deliver OUTPUT --to DEST [--placements feed=1080x1080,...] [--fit crop|pad]: approved images, placed."""

from __future__ import annotations

import argparse
import json

from promptmill.pipelines.delivery.placements import DEFAULT_PLACEMENTS, FITS
from promptmill.pipelines.layout import IMAGE_FORMATS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deliver", help="the approved images of a run in every placement, with provenance and a manifest")
    p.add_argument("output", help="output URL of a generate job (local or s3://)")
    p.add_argument("--to", required=True, help="destination folder or URL (local or s3://)")
    p.add_argument("--placements", default=DEFAULT_PLACEMENTS, help=f"NAME=WxH,... (default {DEFAULT_PLACEMENTS})")
    p.add_argument("--fit", default="crop", choices=FITS, help="crop: fill the placement; pad: fit the whole image")
    p.add_argument("--pad-color", default="auto", help="with --fit pad: #RRGGBB, or auto (the image's border colour)")
    p.add_argument("--format", default="jpeg", choices=list(IMAGE_FORMATS), help="encoding of the delivered files")
    p.add_argument("--workers", type=int, default=4, help="images fitted and written at once")
    p.add_argument("--storage-options", default="{}", help="JSON fsspec options for OUTPUT (and DEST, unless given)")
    p.add_argument("--to-storage-options", default=None, help="JSON fsspec options for DEST")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from promptmill.jobs import error
    from promptmill.pipelines.delivery.deliver import DeliverSettings, deliver
    from promptmill.pipelines.delivery.placements import parse_colour, parse_placements

    try:
        settings = DeliverSettings(tuple(parse_placements(args.placements)), args.fit, args.format,
                                   parse_colour(args.pad_color), max(1, args.workers))
        opts = json.loads(args.storage_options)
        to_opts = json.loads(args.to_storage_options) if args.to_storage_options else None
        result = deliver(args.output, args.to, settings, opts, to_opts)
    except (FileNotFoundError, ValueError) as e:
        return error(e)
    print(json.dumps(result.as_dict()))
    return 0
