"""promptmill train KIND [--config RECIPE.yaml] --data URL --out URL [...]: train on Ray Train, export a checkpoint.

The shipped models' recipes are versioned YAML files (`pipelines/training/configs/<kind>.yaml`, the fields of
`TrainSpec`); flags given on the command line override them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from promptmill.pipelines.training import KINDS

# flag -> TrainSpec field, for flags whose value is taken as is (None = not given)
_FIELDS = {"data": "data", "out": "out", "steps": "steps", "batch_size": "batch_size", "seed": "seed",
           "workers": "num_workers", "threads": "threads", "storage_path": "storage_path", "name": "name",
           "image_column": "image_column", "caption_column": "caption_column",
           "attributes_column": "attributes_column", "max_rows": "max_rows", "vq": "vq", "clip": "clip",
           "checkpoint_every": "checkpoint_every"}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on image-caption Parquet (Ray Train)")
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--config", help="recipe YAML (TrainSpec fields), e.g. pipelines/training/configs/gan.yaml")
    p.add_argument("--data", help="image-caption Parquet: file, directory, glob or URL")
    p.add_argument("--out", help="where the exported checkpoint directory goes")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, help="data-parallel workers (Ray Train)")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--threads", type=int, help="torch threads (and CPUs) per worker")
    p.add_argument("--storage-path", help="Ray Train checkpoints; local or s3:// (default runs/train)")
    p.add_argument("--name", help="run name; rerunning the same name resumes")
    p.add_argument("--image-column")
    p.add_argument("--caption-column")
    p.add_argument("--attributes-column")
    p.add_argument("--max-rows", type=int)
    p.add_argument("--vq", help="VQ checkpoint (transformer only)")
    p.add_argument("--clip", help="CLIP checkpoint: the GAN's frozen text encoder and contrastive guide (gan only)")
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--model", action="append", default=[], metavar="KEY=VALUE", help="model config field")
    p.add_argument("--recipe", action="append", default=[], metavar="KEY=VALUE", help="recipe option (lr, ...)")
    p.set_defaults(func=main)


def train_spec_data(args: argparse.Namespace) -> dict:
    """The recipe file (if any), then the flags given; `--model` / `--recipe` merge into its dicts."""
    from promptmill.pipelines.spec import SpecError, parse_overrides, spec_data

    data, name = spec_data(Path(args.config), kind="recipe") if args.config else ({}, "")
    if data.setdefault("kind", args.kind) != args.kind:
        raise SpecError(f"{name} is a {data['kind']!r} recipe, not {args.kind!r}")
    data.update({f: getattr(args, a) for a, f in _FIELDS.items() if getattr(args, a) is not None})
    if args.gpu:
        data["use_gpu"] = True
    for key, flag in (("model", "--model"), ("recipe", "--recipe")):
        data[key] = {**data.get(key, {}), **dict(parse_overrides(getattr(args, key), flag))}
    return data


def main(args: argparse.Namespace) -> int:
    from promptmill.pipelines.spec import SpecError, validated
    from promptmill.pipelines.training.driver import TrainSpec, run_training

    try:
        spec = validated(TrainSpec, train_spec_data(args), args.config or "(command line)")
    except SpecError as e:
        raise SystemExit(f"promptmill train: {e}") from None
    summary = run_training(spec)
    print(json.dumps({k: summary[k] for k in ("kind", "steps", "wall_s_this_run", "final")}))
    return 0
