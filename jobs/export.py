"""promptmill export SRC DST --dtype fp16: re-save a checkpoint with another storage dtype (loading upcasts to fp32)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="copy a checkpoint, casting floating weights (fp16 halves the size)")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from promptmill.models.checkpoint import load_checkpoint, save_checkpoint
    from promptmill.models.precision import DTYPES

    config, tensors = load_checkpoint(args.src)
    save_checkpoint(args.dst, tensors, config, dtype=DTYPES[args.dtype])
    print(f"{args.src} -> {args.dst} ({args.dtype})")
    return 0
