"""promptmill deliver OUTPUT --to DEST [--placements feed=1080x1080,...] [--fit crop|pad]: approved images, placed."""

from __future__ import annotations

import argparse
import json

from promptmill.jobs import add_storage_options, json_object
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
    add_storage_options(p, "OUTPUT (and DEST, unless --to-storage-options)")
    p.add_argument("--to-storage-options", type=json_object, default=None, metavar="JSON", help="fsspec options for DEST")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from promptmill.jobs import error
    from promptmill.pipelines.delivery.deliver import DeliverSettings, deliver
    from promptmill.pipelines.delivery.placements import parse_colour, parse_placements

    try:
        settings = DeliverSettings(tuple(parse_placements(args.placements)), args.fit, args.format,
                                   parse_colour(args.pad_color), max(1, args.workers))
        result = deliver(args.output, args.to, settings, args.storage_options, args.to_storage_options)
    except (FileNotFoundError, ValueError) as e:
        return error(e)
    print(json.dumps(result.as_dict()))
    return 0
