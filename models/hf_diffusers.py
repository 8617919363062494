"""The `diffusers` family: any diffusers pipeline directory (aMUSEd, Stable Diffusion 1.x/2.x/XL and Turbo, DiT
pipelines such as PixArt or SD3) behind the generator seam, through one generic adapter.

The directory (`model_index.json` + parts) may live on any fsspec URL: it is copied once per node into a local
cache keyed by the URL and every file's size and etag, then loaded with `from_pretrained(local_dir)` with the hub
offline. Each image gets its own `torch.Generator` seeded from its seed, so pixels do not depend on the batch or
the actor (pipelines whose scheduler cannot take one generator per image, such as aMUSEd's, are called one
image at a time). Needs the optional extra: `pip install promptmill[diffusers]`.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import fsspec
import numpy as np
import torch
from promptmill.models.checkpoint import CheckpointError
from promptmill.models.generator import check_inputs
from promptmill.models.local_cache import local_copy, refuse_pickled_weights
from promptmill.models.precision import DTYPES
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

INDEX = "model_index.json"
# arguments the adapter itself sets (one image per prompt, our generators, numpy out), or that only code can pass
RESERVED = {"self", "prompt", "generator", "output_type", "return_dict", "num_images_per_prompt", "latents", "kwargs",
            "prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
            "encoder_hidden_states", "negative_encoder_hidden_states", "callback", "callback_steps",
            "callback_on_step_end", "callback_on_step_end_tensor_inputs", "ip_adapter_image",
            "ip_adapter_image_embeds", "cross_attention_kwargs", "timesteps", "sigmas"}


class DiffusersCommon(BaseModel):
    """The sampling parameters every text-to-image pipeline shares; a pipeline's other call arguments are allowed
    by name (see `sampling_model`)."""

    model_config = ConfigDict(extra="forbid")
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000)
    guidance_scale: float | None = Field(default=None, ge=0, le=100)
    negative_prompt: str | list[str] | None = None  # a list: one per prompt (input.negative_prompt_column)
    height: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)
    width: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)
    scheduler: str | None = Field(default=None, description="a diffusers scheduler class by name (e.g. "
                                  "EulerAncestralDiscreteScheduler), built from the pipeline's scheduler config")

    @field_validator("scheduler")
    @classmethod
    def _scheduler_class(cls, v: str | None) -> str | None:
        if v is not None:
            scheduler_class(v)
        return v


def scheduler_class(name: str) -> type:
    """The diffusers scheduler class `name`; ValueError listing what there is."""
    import diffusers

    def usable(n: str) -> bool:  # a class, not the placeholder diffusers puts where an optional package is missing
        c = getattr(diffusers, n, None)
        return isinstance(c, type) and issubclass(c, diffusers.SchedulerMixin) and "Dummy" not in type(c).__name__

    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if cls is not None and "Dummy" in type(cls).__name__:
        raise ValueError(f"{name!r} needs a package diffusers leaves optional (its message: pip install the "
                         "backend it names, e.g. scipy for LMSDiscreteScheduler)")
    if not (name.isidentifier() and usable(name)):
        known = sorted(n for n in dir(diffusers) if n.endswith("Scheduler") and usable(n))
        raise ValueError(f"{name!r} is not a diffusers scheduler class; diffusers {diffusers.__version__} has "
                         f"{', '.join(known[:40])}")
    return cls


def pipeline_class(local_or_url: str, storage_options: dict | None = None) -> type:
    """The pipeline class a directory's model_index.json names (diffusers imported here: an optional extra)."""
    try:
        import diffusers
    except ImportError as e:
        raise CheckpointError("the diffusers family needs the optional extra: pip install 'promptmill[diffusers]'") from e
    try:
        with fsspec.open(f"{local_or_url.rstrip('/')}/{INDEX}", "rb", **(storage_options or {})) as f:
            index = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {local_or_url!r}: no {INDEX} (not a diffusers pipeline directory)") from e
    except ValueError as e:
        raise CheckpointError(f"checkpoint {local_or_url!r}: {INDEX} is not valid JSON ({e})") from e
    name = index.get("_class_name") if isinstance(index, dict) else None
    if not isinstance(name, str) or not name.isidentifier():
        raise CheckpointError(f"checkpoint {local_or_url!r}: {INDEX} is not valid: it needs an object whose "
                              f"\"_class_name\" names a diffusers pipeline class (got {str(name)[:80]!r})")
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise CheckpointError(f"checkpoint {local_or_url!r}: {INDEX} names {name!r}, which diffusers "
                              f"{diffusers.__version__} does not have")
    return cls


def sampling_model(cls: type) -> type[BaseModel]:
    """The common parameters, plus the pipeline's own call arguments by name (typed by the pipeline)."""
    params = inspect.signature(cls.__call__).parameters
    own = {n: (Any, None) for n in params if n not in RESERVED and n not in DiffusersCommon.model_fields}
    return create_model(f"{cls.__name__}Sampling", __base__=DiffusersCommon, **own)


def _load_loras(pipe: Any, loras: list, storage_options: dict | None, url: str) -> None:
    """Each adapter from its own local copy (the cache the pipelines use), safetensors only, then all of them at
    their weights. A pipeline without a LoRA loader, or an adapter it cannot take, is a CheckpointError naming it."""
    if not hasattr(pipe, "load_lora_weights"):
        raise CheckpointError(f"checkpoint {url!r}: {type(pipe).__name__} has no LoRA loader (models[].loras)")
    names = []
    for i, lora in enumerate(loras):
        where = f"loras[{i}] {lora.path!r}"
        local = local_copy(lora.path, storage_options)
        refuse_pickled_weights(local, lora.path)
        try:
            pipe.load_lora_weights(local, weight_name=lora.weight_name, adapter_name=f"lora{i}")
        except (OSError, ValueError, KeyError, RuntimeError, TypeError, ImportError) as e:
            raise CheckpointError(f"{where}: {type(pipe).__name__} cannot load it ({e})") from e
        names.append(f"lora{i}")
    pipe.set_adapters(names, adapter_weights=[lora.weight for lora in loras])


def _default_size(pipe: Any) -> int:
    scale = getattr(pipe, "vae_scale_factor", 1) or 1
    for part in ("unet", "transformer"):
        size = getattr(getattr(getattr(pipe, part, None), "config", None), "sample_size", None)
        if isinstance(size, int):
            return size * scale
    return 512


class DiffusersGenerator:
    """`last_info` after each `generate`: per image, `non_finite` (NaN / inf anywhere: an fp16 VAE overflow) and
    `nsfw` (the safety checker's flag, None without one); the job rejects or flags those rows."""

    family = "diffusers"
    handles_precision = True  # `precision` is the weights' dtype (models.precision leaves it alone)

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe, self.device = pipe, device
        self.pipeline_class = type(pipe).__name__
        self.Sampling = sampling_model(type(pipe))
        self.height = self.width = _default_size(pipe)
        self.per_image = False  # set when the pipeline cannot take one generator per image
        self.precision = "fp32"
        self._scheduler_config = None
        self.last_info: dict[str, list] = {}

    @classmethod
    def preflight(cls, url: str, storage_options: dict | None, sampling: dict) -> None:
        """Check the directory and the sampling from model_index.json alone: no weights in the driver."""
        sampling_model(pipeline_class(url, storage_options))(**sampling)

    @classmethod
    def load(cls, url: str, device: torch.device, storage_options: dict | None = None, precision: str | None = None,
             variant: str | None = None, loras: list | None = None) -> DiffusersGenerator:
        """`precision`: the weights' dtype (None: fp16 on CUDA, fp32 elsewhere); `variant`: which weight files;
        `loras`: adapters (path, weight, weight_name), through the pipeline's own LoRA loader."""
        pipeline_class(url, storage_options)  # a clear error before any copy
        precision = precision or ("fp16" if device.type == "cuda" else "fp32")
        if precision == "fp16" and device.type != "cuda":
            raise CheckpointError(f"checkpoint {url!r}: precision fp16 runs on CUDA only; on {device.type} use bf16 "
                                  "or fp32 (models[].precision)")
        local = local_copy(url, storage_options)
        os.environ["HF_HUB_OFFLINE"] = "1"  # never a hub download at run time
        from diffusers import DiffusionPipeline

        refuse_pickled_weights(local, url)
        try:  # safetensors only: a .bin is a pickle, which can run code when it is loaded
            pipe = DiffusionPipeline.from_pretrained(local, dtype=DTYPES[precision], local_files_only=True,
                                                     use_safetensors=True, variant=variant)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            hint = f" (variant {variant!r}: are its files there?)" if variant else ""
            raise CheckpointError(f"checkpoint {url!r}: diffusers cannot load it{hint} ({e})") from e
        pipe.set_progress_bar_config(disable=True)
        if loras:
            _load_loras(pipe, loras, storage_options, url)
        gen = cls(pipe.to(device), device)
        gen.precision = precision
        return gen

    def _call(self, prompts: list[str], seeds: list[int], s: BaseModel) -> tuple[np.ndarray, list]:
        """Float images in [0, 1] (NaN where the pipeline overflowed) and the safety checker's flags (None each
        when the pipeline has no checker). Noise comes from CPU generators: the same on any device (diffusers'
        own advice for reproducibility)."""
        gens = [torch.Generator(device="cpu").manual_seed(seed) for seed in seeds]
        kwargs = {k: v for k, v in s.model_dump().items() if v is not None and k != "scheduler"}
        if isinstance(kwargs.get("negative_prompt"), str):  # diffusers wants it the same type as `prompt` (a list)
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompts)
        self._use_scheduler(s.scheduler)
        kwargs.setdefault("height", self.height)
        kwargs.setdefault("width", self.width)
        out = self.pipe(prompt=prompts, generator=gens[0] if self.per_image else gens, output_type="np", **kwargs)
        flags = getattr(out, "nsfw_content_detected", None)
        return np.asarray(out.images, np.float32), list(flags) if flags is not None else [None] * len(prompts)

    def _use_scheduler(self, name: str | None) -> None:
        """`sampling.scheduler`: that class from the pipeline's own scheduler config (its betas, its steps)."""
        if name is None or type(self.pipe.scheduler).__name__ == name:
            return
        if self._scheduler_config is None:
            self._scheduler_config = self.pipe.scheduler.config  # the pipeline's own, kept for later swaps
        self.pipe.scheduler = scheduler_class(name).from_config(self._scheduler_config)

    @property
    def max_prompt_tokens(self) -> int | None:
        """The text encoder's token limit, read from the pipeline's tokenizer (None when it states none)."""
        n = getattr(getattr(self.pipe, "tokenizer", None), "model_max_length", None)
        return n if isinstance(n, int) and 0 < n < 100_000 else None

    def prompt_tokens(self, prompts: list[str]) -> list[int]:
        """Tokens each prompt takes in the text encoder, before any cut (start and end tokens included)."""
        tok = self.pipe.tokenizer
        return [len(ids) for ids in tok(list(prompts), truncation=False)["input_ids"]]

    @torch.inference_mode()
    def generate(self, prompts: list[str], seeds: list[int], **sampling) -> np.ndarray:
        check_inputs(prompts, seeds)
        s = self.Sampling(**sampling)
        if not prompts:
            size = (s.height or self.height, s.width or self.width)
            return np.zeros((0, *size, 3), np.uint8)
        if not self.per_image:
            try:  # one generator per image (a list), the same draws at any batch size
                images, nsfw = self._call(prompts, seeds, s)
            except (AttributeError, TypeError, ValueError) as e:
                if "generator" not in str(e) and "device" not in str(e):
                    raise
                self.per_image = True  # e.g. aMUSEd's scheduler takes one generator for the whole batch
        if self.per_image:
            own = [s.model_copy(update={"negative_prompt": s.negative_prompt[i]}) if isinstance(s.negative_prompt, list)
                   else s for i in range(len(prompts))]  # a per-row negative prompt goes with its image
            calls = [self._call([p], [seed], o) for p, seed, o in zip(prompts, seeds, own)]
            images, nsfw = np.concatenate([c[0] for c in calls]), [c[1][0] for c in calls]
        finite = np.isfinite(images.reshape(len(images), -1)).all(1)
        self.last_info = {"non_finite": [not f for f in finite], "nsfw": nsfw}
        return (np.clip(np.nan_to_num(images, nan=0.0), 0, 1) * 255).round().astype(np.uint8)
