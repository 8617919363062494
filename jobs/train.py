"""promptmill train vq|transformer|gan|judge|clip --data URL --out URL [...]: train on Ray Train, export a checkpoint."""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml

from pipelines.train import KINDS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on image-caption Parquet (Ray Train)")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--data", required=True, help="image-caption Parquet: file, directory, glob or URL")
    p.add_argument("--out", required=True, help="where the exported checkpoint directory goes")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="data-parallel workers (Ray Train)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker")
    p.add_argument("--threads", type=int, default=2, help="torch threads (and CPUs) per worker")
    p.add_argument("--storage-path", default="runs/train", help="Ray Train checkpoints; local or s3://")
    p.add_argument("--name", help="run name; rerunning the same name resumes")
    p.add_argument("--image-column", default="png")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--attributes-column", default="attributes")
    p.add_argument("--max-rows", type=int)
    p.add_argument("--vq", help="VQ checkpoint (transformer only)")
    p.add_argument("--clip", help="CLIP checkpoint: the GAN's frozen text encoder and contrastive guide (gan only)")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE", help="model config override")
    p.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE", help="recipe option (lr, ...)")
    p.set_defaults(func=main)


def _value(text: str) -> Any:
    """YAML scalars, except that YAML 1.1 reads "1e-4" as a string: a float is what anyone typing it means."""
    v = yaml.safe_load(text)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _kv(items: list[str]) -> dict:
    return {k: _value(v) for k, v in (i.split("=", 1) for i in items)}


def main(args: argparse.Namespace) -> int:
    from pipelines.train import TrainSpec, run_training

    try:
        spec = TrainSpec(kind=args.kind, data=args.data, out=args.out, steps=args.steps, batch_size=args.batch_size,
                         seed=args.seed, num_workers=args.workers, use_gpu=args.gpu, threads=args.threads,
                         storage_path=args.storage_path, name=args.name, image_column=args.image_column,
                         caption_column=args.caption_column, attributes_column=args.attributes_column,
                         max_rows=args.max_rows, vq=args.vq, clip=args.clip, checkpoint_every=args.checkpoint_every,
                         model=_kv(args.model), recipe=_kv(args.recipe))
    except ValueError as e:
        raise SystemExit(f"promptmill train: {e}") from None
    summary = run_training(spec)
    print(json.dumps({k: summary[k] for k in ("kind", "steps", "wall_s_this_run", "final")}))
    return 0
