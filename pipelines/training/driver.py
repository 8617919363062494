"""Training on Ray Train: one driver for every recipe (`promptmill train vq|transformer|gan|judge`).

TorchTrainer + ScalingConfig(num_workers, use_gpu) make the same command data-parallel on a GPU cluster.
Each worker reads its shard (rows rank::world) of any image-caption Parquet; checkpoints (safetensors:
weights + optimizer state + loss history) go to `storage_path` and a rerun with the same name resumes
from the latest. Batches and noise are functions of (seed, step), so a resumed run equals an unbroken one.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import fields
from typing import Any, Literal

import numpy as np
import torch
from promptmill.models.checkpoint import load_checkpoint, open_checkpoint
from promptmill.models.clip import CLIPConfig
from promptmill.models.clip_loader import load_clip
from promptmill.models.families import generator_class
from promptmill.models.gan import GANConfig
from promptmill.models.generator import sampling_defaults
from promptmill.models.images import decode_image, to_nchw
from promptmill.models.judge import JudgeConfig, labels, scene_from_dict
from promptmill.models.tokenizer import WordTokenizer
from promptmill.models.transformer import TransformerConfig
from promptmill.models.vq import VQConfig, load_vq
from promptmill.pipelines.spec import CheckpointRef, Strict
from promptmill.pipelines.storage import absolute, filesystem, join
from promptmill.pipelines.tables import read_rows
from promptmill.pipelines.training import KINDS
from promptmill.pipelines.training.recipes import Batch, CLIPRecipe, GANRecipe, JudgeRecipe, Recipe, TransformerRecipe, VQRecipe
from pydantic import Field, ValidationError, model_validator
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)


# kind -> (recipe, model config): what `promptmill train KIND` builds
RECIPES: dict[str, tuple[type[Recipe], type]] = {
    "vq": (VQRecipe, VQConfig), "transformer": (TransformerRecipe, TransformerConfig), "gan": (GANRecipe, GANConfig),
    "judge": (JudgeRecipe, JudgeConfig), "clip": (CLIPRecipe, CLIPConfig),
}


class TrainSpec(Strict):
    """One training run; also the schema of the versioned recipe configs in `pipelines/training/configs/`."""

    kind: Literal[KINDS] = Field(description="which model to train")  # type: ignore[valid-type]
    data: str | list[str] = Field(description="image-caption Parquet: file, directory, glob or fsspec URL, or a "
                                  "list of them (read in order)")
    out: str = Field(description="where the exported checkpoint directory goes")
    steps: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=64, ge=1, description="per worker")
    seed: int = 0
    num_workers: int = Field(default=1, ge=1, description="data-parallel Ray Train workers")
    use_gpu: bool = Field(default=False, description="one GPU per worker")
    threads: int = Field(default=2, ge=1, description="torch threads (and CPUs) per worker")
    storage_path: str = Field(default="runs/train", description="Ray Train checkpoints; local or any fsspec URL")
    name: str | None = Field(default=None, description="run name; rerunning the same name resumes")
    image_column: str = "png"
    caption_column: str = "caption"
    attributes_column: str = Field(default="attributes", description="judge targets (JSON scene per row)")
    max_rows: int | None = Field(default=None, ge=1)
    vq: CheckpointRef | None = Field(default=None, description="transformer: the VQ checkpoint that tokenizes images "
                                     "(path, URL or shipped:vq)")
    clip: CheckpointRef | None = Field(default=None, description="gan: the CLIP whose frozen towers encode captions "
                                       "and guide G (path, URL or shipped:clip)")
    init: CheckpointRef | None = Field(default=None, description="gan or transformer: a fine-tune from this export "
                                       "(path, URL, shipped:gan or shipped:dalle). gan: G and its EMA start from "
                                       "it, D fresh, and its config and text tower must be the recipe's; "
                                       "transformer: the model starts from it, with its tokenizer, and its config "
                                       "and VQ must be the run's")
    sampling: dict[str, Any] = Field(default_factory=dict, description="gan or transformer: the sampling the export "
                                     "recommends (its config.json `sampling`), which a job's sampling overrides key "
                                     "by key; unset, a fine-tune's export recommends what its init did")
    checkpoint_every: int = Field(default=500, ge=1)
    max_failures: int = Field(default=3, ge=0, description="a dead worker (spot node, failed health check) "
                              "restarts from the latest checkpoint, this many times")
    log_every: int = Field(default=50, ge=1)
    model: dict[str, Any] = Field(default_factory=dict, description="model config fields (the kind's config dataclass)")
    recipe: dict[str, Any] = Field(default_factory=dict, description="recipe options (the kind's `Options` model)")
    storage_options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> TrainSpec:
        # Ray Train workers do not share the driver's cwd
        self.data = [absolute(d) for d in self.data] if isinstance(self.data, list) else absolute(self.data)
        self.out = absolute(self.out)
        self.vq = absolute(self.vq) if self.vq else None
        self.clip = absolute(self.clip) if self.clip else None
        self.init = absolute(self.init) if self.init else None
        if self.init and self.kind not in ("gan", "transformer"):
            raise ValueError(f"init: only a gan or transformer run starts from an exported checkpoint, "
                             f"not a {self.kind} run")
        if self.checkpoint_every % self.log_every:
            raise ValueError(f"checkpoint_every: {self.checkpoint_every} is not a multiple of log_every "
                             f"{self.log_every} (a run checkpoints at logged steps only)")
        if self.sampling:
            if self.kind not in ("gan", "transformer"):
                raise ValueError(f"sampling: only a generator's export recommends sampling, not a {self.kind}'s")
            try:
                generator_class(self.kind).Sampling(**self.sampling)
            except ValidationError as e:
                raise ValueError(f"sampling: {e}") from None
        for kind, field_, what in (("transformer", "vq", "VQ"), ("gan", "clip", "CLIP")):
            if self.kind == kind and not getattr(self, field_):
                raise ValueError(f"training a {kind} needs {field_}: the {what} checkpoint it builds on")
        recipe_cls, config_cls = RECIPES[self.kind]
        known = sorted(f.name for f in fields(config_cls))
        for k in self.model:
            if k not in known:
                raise ValueError(f"model.{k}: not a {self.kind} model option; known: {known}")
        try:
            recipe_cls.Options(**self.recipe)
        except ValidationError as e:
            known = sorted(recipe_cls.Options.model_fields)
            bad = "; ".join(f"recipe.{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise ValueError(f"{bad} (the {self.kind} recipe's options: {known})") from None
        return self

    @property
    def run_name(self) -> str:
        return self.name or f"{self.kind}-seed{self.seed}"


def train_tokenizer(spec: TrainSpec) -> WordTokenizer:
    """The run's tokenizer: a fine-tune keeps its export's (the model's embeddings index that vocabulary)."""
    if spec.init:
        config = open_checkpoint(spec.init, spec.storage_options, kind=spec.kind)[0]
        return WordTokenizer.from_config(config["tokenizer"])
    caps = read_rows(spec.data, [spec.caption_column], spec.storage_options, spec.max_rows)[spec.caption_column]
    return WordTokenizer.train(caps, max_len=spec.model.get("text_len", 24))


def build_recipe(spec: TrainSpec, tokenizer: WordTokenizer | None) -> Recipe:
    """The spec's recipe; a fine-tune starts from its `init` export and, unless the spec says otherwise, its export
    recommends the sampling that one did."""
    recipe = _recipe(spec, tokenizer)
    recommended = dict(spec.sampling)
    if spec.init:
        config, tensors = load_checkpoint(spec.init, spec.storage_options, kind=spec.kind)
        recipe.start_from(spec.init, (config, tensors))
        recommended = recommended or sampling_defaults(generator_class(spec.kind), config)
    recipe.sampling_defaults = recommended
    return recipe


def _recipe(spec: TrainSpec, tokenizer: WordTokenizer | None) -> Recipe:
    m, r = dict(spec.model), dict(spec.recipe)
    if spec.kind == "judge":
        return JudgeRecipe(JudgeConfig(**m), **r)
    if spec.kind == "vq":
        return VQRecipe(VQConfig(**m), **r)
    if spec.kind == "clip":
        return CLIPRecipe(CLIPConfig(**{**m, "vocab_size": len(tokenizer.vocab), "text_len": tokenizer.max_len}), tokenizer,
                          steps=spec.steps, seed=spec.seed, **r)
    if spec.kind == "gan":
        clip = load_clip(spec.clip, storage_options=spec.storage_options)
        return GANRecipe(GANConfig(**{**m, "text_dim": clip.model.cfg.embed_dim}), clip, seed=spec.seed, **r)
    vq = load_vq(spec.vq, storage_options=spec.storage_options)
    vq_cfg = vq.cfg
    cfg = TransformerConfig(text_vocab=len(tokenizer.vocab), image_vocab=vq_cfg.codebook_size,
                            image_tokens=vq_cfg.grid**2, **m)
    return TransformerRecipe(cfg, vq, vq_cfg, tokenizer, steps=spec.steps, seed=spec.seed, **r)


def load_data(spec: TrainSpec, recipe: Recipe, rank: int, world: int) -> dict[str, Any]:
    cols = [spec.image_column, spec.caption_column] + ([spec.attributes_column] if spec.kind == "judge" else [])
    rows = read_rows(spec.data, cols, spec.storage_options, spec.max_rows, rank, world)
    images = to_nchw(np.stack([decode_image(b) for b in rows[spec.image_column]]))
    data: dict[str, Any] = {"images": images, "captions": rows[spec.caption_column]}
    if spec.kind == "judge":
        attributes = [json.loads(a) for a in rows[spec.attributes_column]]
        data["labels"] = labels([scene_from_dict(a) for a in attributes], [bool(a.get("near_miss")) for a in attributes])
    if isinstance(recipe, TransformerRecipe):
        with torch.no_grad():
            data["tokens"] = torch.cat([recipe.vq.encode(images[i:i + 512].float() / 127.5 - 1)
                                        for i in range(0, len(images), 512)])
    return data


def make_batch(data: dict[str, Any], step: int, batch_size: int, seed: int) -> Batch:
    """Epoch-wise permutations seeded by (seed, epoch): batch `step` is the same on every (re)run."""
    n = data["images"].size(0)
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    idx = perm[k * batch_size:(k + 1) * batch_size]
    return Batch(data["images"][idx], [data["captions"][i] for i in idx.tolist()],
                 {k: v[idx] for k, v in data.get("labels", {}).items()},
                 data["tokens"][idx] if "tokens" in data else None)


def train_loop(config: dict) -> None:
    """One worker's steps. It reports to Ray Train only when it checkpoints: the controller takes one report per
    worker per poll and polls every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), and `ray.train.report` blocks while
    the previous one waits, so a report every `log_every` steps stalled any run that logged faster than that. The
    history travels in the checkpoint's meta.json; rank 0 logs the progress line itself (Ray Train's worker
    logging shows INFO)."""
    import ray.train
    import ray.train.torch

    spec = TrainSpec(**config["spec"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(spec.threads)
    tokenizer = WordTokenizer.from_config(config["tokenizer"]) if config.get("tokenizer") else None
    torch.manual_seed(spec.seed)
    recipe = build_recipe(spec, tokenizer)
    device = ray.train.torch.get_device() if spec.use_gpu else torch.device("cpu")  # this worker's GPU
    recipe.to(device)
    data = load_data(spec, recipe, rank, world)
    start, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            recipe.load_state(load_file(os.path.join(d, "state.safetensors")))
            meta = json.load(open(os.path.join(d, "meta.json")))
            start, history = meta["step"], meta["history"]
        log.info("resumed %s at step %d", spec.run_name, start)
    t0, acc = time.time(), {}
    for step in range(start, spec.steps):
        torch.manual_seed(spec.seed * 7919 + step)
        logs = recipe.step(make_batch(data, step, spec.batch_size, spec.seed + rank).to(device), step)
        for k, v in logs.items():
            acc.setdefault(k, []).append(v)
        last = step + 1 == spec.steps
        if (step + 1) % spec.log_every and not last:
            continue
        metrics = {"step": step + 1, "s_per_step": (time.time() - t0) / len(next(iter(acc.values()))),
                   **{k: float(np.mean(v)) for k, v in acc.items()}}
        history.append(metrics)
        t0, acc = time.time(), {}
        if rank == 0:
            log.info("%s step %d/%d %s", spec.run_name, step + 1, spec.steps,
                     " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "step"))
        if (step + 1) % spec.checkpoint_every and not last:
            continue
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)  # every rank reports as often as rank 0
            continue
        with tempfile.TemporaryDirectory() as d:
            save_file({k: v.contiguous() for k, v in recipe.state().items()}, os.path.join(d, "state.safetensors"))
            json.dump({"step": step + 1, "history": history, "spec": config["spec"]}, open(os.path.join(d, "meta.json"), "w"))
            recipe.export(os.path.join(d, "export"))
            recipe.to(device)  # export builds a CPU inference model from the recipe's own modules
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def plot_history(history: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in history[0] if k not in ("step", "s_per_step")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    steps = [h["step"] for h in history]
    for ax, k in zip(axes[0], keys):
        ax.plot(steps, [h[k] for h in history])
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# fields that may change when a run is resumed (more steps, more workers, another export path or recommendation)
RESUMABLE = {"steps", "checkpoint_every", "log_every", "threads", "num_workers", "use_gpu", "out", "storage_path",
             "max_failures", "sampling"}


def check_resumable(spec: TrainSpec, storage: str) -> None:
    """Refuse to resume a run of the same name that trained something else (it would silently continue it)."""
    fs, root = filesystem(join(storage, spec.run_name), spec.storage_options)
    metas = sorted(f for f in (fs.glob(join(root, "checkpoint_*/meta.json")) if fs.exists(root) else []))
    if not metas:
        return
    saved = json.loads(fs.cat_file(metas[-1])).get("spec", {})
    # a field newer than the run reads as its default (the run trained with what the default does)
    old = {**TrainSpec.model_construct().model_dump(mode="json"), **saved}
    new = {k: v for k, v in spec.model_dump(mode="json").items() if k not in RESUMABLE}
    diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if diff:
        raise ValueError(f"run {spec.run_name!r} in {storage} was trained with other settings {diff} "
                         f"(old, new); pass another --name or delete that run to start over")


def run_training(spec: TrainSpec) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        # with its dashboard (Ray's default, None, starts it): Ray Train's placement-group cleaner asks the State API
        # (served there) whether the run's controller lives; without it, it warned every second of the run and could
        # never clean up. Not True: where Ray is installed without its dashboard's packages (ray[data,train], as on a
        # lent GPU machine) True refuses to start, None starts a minimal one and the run goes on
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=None)
    tokenizer = train_tokenizer(spec) if spec.kind in ("transformer", "clip") else None  # the GAN uses its CLIP's
    storage = spec.storage_path if "://" in spec.storage_path else os.path.abspath(spec.storage_path)
    check_resumable(spec, storage)
    if spec.init:  # the export must fit the run: said here once, not by each worker Ray Train restarts
        build_recipe(spec, tokenizer)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.model_dump(mode="json"), "tokenizer": tokenizer.to_config() if tokenizer else None},
        scaling_config=ScalingConfig(num_workers=spec.num_workers, use_gpu=spec.use_gpu,
                                     resources_per_worker={"CPU": spec.threads}),
        run_config=RunConfig(name=spec.run_name, storage_path=storage,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=spec.max_failures)),
    )
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0
    fs, out = filesystem(spec.out, spec.storage_options)
    fs.makedirs(join(out, "training"), exist_ok=True)
    with result.checkpoint.as_directory() as d:
        meta = json.load(open(os.path.join(d, "meta.json")))
        fs.put(os.path.join(d, "export") + "/", out, recursive=True)
        with tempfile.TemporaryDirectory() as t:
            plot_history(meta["history"], os.path.join(t, "loss.png"))
            fs.put(os.path.join(t, "loss.png"), join(out, "training", "loss.png"))
    summary = {"kind": spec.kind, "steps": meta["step"], "wall_s_this_run": round(wall, 1), "spec": spec.model_dump(mode="json"),
               "final": meta["history"][-1], "history": meta["history"]}
    fs.pipe(join(out, "training", "history.json"), json.dumps(summary, indent=1).encode())
    return summary
