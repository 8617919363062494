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
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file

from models.clip import CLIPConfig, load_clip
from models.gan import GANConfig
from models.judge import JudgeConfig, labels, scene_from_dict
from models.recipes import Batch, CLIPRecipe, GANRecipe, JudgeRecipe, Recipe, TransformerRecipe, VQRecipe
from models.tokenizer import WordTokenizer
from models.transformer import TransformerConfig
from models.vq import VQConfig, load_vq
from pipelines.encode import decode_image
from pipelines.read import list_files
from pipelines.storage import absolute, filesystem, join

log = logging.getLogger(__name__)
KINDS = ("vq", "transformer", "gan", "judge", "clip")


@dataclass
class TrainSpec:
    kind: str
    data: str
    out: str
    steps: int = 2000
    batch_size: int = 64
    seed: int = 0
    num_workers: int = 1
    use_gpu: bool = False
    threads: int = 2
    storage_path: str = "runs/train"
    name: str | None = None
    image_column: str = "png"
    caption_column: str = "caption"
    attributes_column: str = "attributes"
    max_rows: int | None = None
    vq: str | None = None  # transformer: the VQ checkpoint that tokenizes images
    clip: str | None = None  # gan: the CLIP whose frozen towers encode captions and guide G
    checkpoint_every: int = 500
    max_failures: int = 3  # a dead worker (spot node, failed health check) restarts from the latest checkpoint
    log_every: int = 50
    model: dict[str, Any] = field(default_factory=dict)  # model config overrides
    recipe: dict[str, Any] = field(default_factory=dict)  # recipe kwargs (lr, caption_dropout, ...)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Ray Train workers do not share the driver's cwd
        self.data, self.out = absolute(self.data), absolute(self.out)
        self.vq = absolute(self.vq) if self.vq else None
        self.clip = absolute(self.clip) if self.clip else None
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        for kind, field_, what in (("transformer", "vq", "VQ"), ("gan", "clip", "CLIP")):
            if self.kind == kind and not getattr(self, field_):
                raise ValueError(f"training a {kind} needs {field_}: the {what} checkpoint it builds on")

    @property
    def run_name(self) -> str:
        return self.name or f"{self.kind}-seed{self.seed}"


def read_rows(data: str, columns: list[str], storage_options: dict | None = None, max_rows: int | None = None,
              rank: int = 0, world: int = 1) -> dict[str, list]:
    """Columns of every Parquet file under `data` (first `max_rows` rows), then this worker's shard."""
    fs, files = list_files(data, storage_options or {})
    out: dict[str, list] = {c: [] for c in columns}
    for f in files:
        with fs.open(f, "rb") as fh:
            t = pq.read_table(fh, columns=columns)
        for c in columns:
            out[c].extend(t.column(c).to_pylist())
        if max_rows and len(out[columns[0]]) >= max_rows:
            break
    n = min(len(out[columns[0]]), max_rows or 1 << 62)
    return {c: v[:n][rank::world] for c, v in out.items()}


def train_tokenizer(spec: TrainSpec) -> WordTokenizer:
    caps = read_rows(spec.data, [spec.caption_column], spec.storage_options, spec.max_rows)[spec.caption_column]
    return WordTokenizer.train(caps, max_len=spec.model.get("text_len", 24))


def build_recipe(spec: TrainSpec, tokenizer: WordTokenizer | None) -> Recipe:
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
        dims = {"text_dim": clip.model.cfg.embed_dim, "word_dim": clip.model.cfg.width}
        return GANRecipe(GANConfig(**{**m, **dims}), clip, seed=spec.seed, **r)
    vq = load_vq(spec.vq, spec.storage_options)
    vq_cfg = vq.cfg
    cfg = TransformerConfig(text_vocab=len(tokenizer.vocab), image_vocab=vq_cfg.codebook_size,
                            image_tokens=vq_cfg.grid**2, **m)
    return TransformerRecipe(cfg, vq, vq_cfg, tokenizer, steps=spec.steps, seed=spec.seed, **r)


def load_data(spec: TrainSpec, recipe: Recipe, rank: int, world: int) -> dict[str, Any]:
    cols = [spec.image_column, spec.caption_column] + ([spec.attributes_column] if spec.kind == "judge" else [])
    rows = read_rows(spec.data, cols, spec.storage_options, spec.max_rows, rank, world)
    images = torch.from_numpy(np.stack([decode_image(b) for b in rows[spec.image_column]])).permute(0, 3, 1, 2).contiguous()
    data: dict[str, Any] = {"images": images, "captions": rows[spec.caption_column]}
    if spec.kind == "judge":
        data["labels"] = labels([scene_from_dict(json.loads(a)) for a in rows[spec.attributes_column]])
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
        if ((step + 1) % spec.checkpoint_every and not last) or rank != 0:
            ray.train.report(metrics, checkpoint=None)
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


# fields that may change when a run is resumed (more steps, more workers, another export path)
RESUMABLE = {"steps", "checkpoint_every", "log_every", "threads", "num_workers", "use_gpu", "out", "storage_path",
             "max_failures"}


def check_resumable(spec: TrainSpec, storage: str) -> None:
    """Refuse to resume a run of the same name that trained something else (it would silently continue it)."""
    fs, root = filesystem(join(storage, spec.run_name), spec.storage_options)
    metas = sorted(f for f in (fs.glob(join(root, "checkpoint_*/meta.json")) if fs.exists(root) else []))
    if not metas:
        return
    old = json.loads(fs.cat_file(metas[-1])).get("spec", {})
    new = {k: v for k, v in spec.__dict__.items() if k not in RESUMABLE}
    diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if diff:
        raise ValueError(f"run {spec.run_name!r} in {storage} was trained with other settings {diff} "
                         f"(old, new); pass another --name or delete that run to start over")


def run_training(spec: TrainSpec) -> dict:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)  # see pipelines.job
    tokenizer = train_tokenizer(spec) if spec.kind in ("transformer", "clip") else None  # the GAN uses its CLIP's
    storage = spec.storage_path if "://" in spec.storage_path else os.path.abspath(spec.storage_path)
    check_resumable(spec, storage)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.__dict__, "tokenizer": tokenizer.to_config() if tokenizer else None},
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
    summary = {"kind": spec.kind, "steps": meta["step"], "wall_s_this_run": round(wall, 1), "spec": spec.__dict__,
               "final": meta["history"][-1], "history": meta["history"]}
    fs.pipe(join(out, "training", "history.json"), json.dumps(summary, indent=1).encode())
    return summary
