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
from promptmill.models.local_cache import local_copy
from pydantic import BaseModel, ConfigDict, Field, create_model

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
    negative_prompt: str | None = None
    height: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)
    width: int | None = Field(default=None, ge=8, le=4096, multiple_of=8)


def pipeline_class(local_or_url: str, storage_options: dict | None = None) -> type:
    """The pipeline class a directory's model_index.json names (diffusers imported here: an optional extra)."""
    try:
        import diffusers
    except ImportError as e:
        raise CheckpointError("the diffusers family needs the optional extra: pip install 'promptmill[diffusers]'") from e
    try:
        with fsspec.open(f"{local_or_url.rstrip('/')}/{INDEX}", "rb", **(storage_options or {})) as f:
            name = json.load(f)["_class_name"]
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint {local_or_url!r}: no {INDEX} (not a diffusers pipeline directory)") from e
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {local_or_url!r}: {INDEX} is not valid ({e})") from e
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


def _default_size(pipe: Any) -> int:
    scale = getattr(pipe, "vae_scale_factor", 1) or 1
    for part in ("unet", "transformer"):
        size = getattr(getattr(getattr(pipe, part, None), "config", None), "sample_size", None)
        if isinstance(size, int):
            return size * scale
    return 512


class DiffusersGenerator:
    family = "diffusers"

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe, self.device = pipe, device
        self.pipeline_class = type(pipe).__name__
        self.Sampling = sampling_model(type(pipe))
        self.height = self.width = _default_size(pipe)
        self.per_image = False  # set when the pipeline cannot take one generator per image

    @classmethod
    def preflight(cls, url: str, storage_options: dict | None, sampling: dict) -> None:
        """Check the directory and the sampling from model_index.json alone: no weights in the driver."""
        sampling_model(pipeline_class(url, storage_options))(**sampling)

    @classmethod
    def load(cls, url: str, device: torch.device, storage_options: dict | None = None) -> DiffusersGenerator:
        pipeline_class(url, storage_options)  # a clear error before any copy
        local = local_copy(url, storage_options)
        os.environ["HF_HUB_OFFLINE"] = "1"  # never a hub download at run time
        from diffusers import DiffusionPipeline

        dtype = torch.float16 if device.type == "cuda" else torch.float32
        try:
            pipe = DiffusionPipeline.from_pretrained(local, torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as e:
            raise CheckpointError(f"checkpoint {url!r}: diffusers cannot load it ({e})") from e
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe.to(device), device)

    def _call(self, prompts: list[str], seeds: list[int], s: BaseModel) -> np.ndarray:
        gens = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]
        kwargs = {k: v for k, v in s.model_dump().items() if v is not None}
        kwargs.setdefault("height", self.height)
        kwargs.setdefault("width", self.width)
        out = self.pipe(prompt=prompts, generator=gens[0] if self.per_image else gens, output_type="np", **kwargs)
        return np.asarray(out.images)

    @torch.inference_mode()
    def generate(self, prompts: list[str], seeds: list[int], **sampling) -> np.ndarray:
        check_inputs(prompts, seeds)
        s = self.Sampling(**sampling)
        if not prompts:
            size = (s.height or self.height, s.width or self.width)
            return np.zeros((0, *size, 3), np.uint8)
        if not self.per_image:
            try:  # one generator per image (a list), the same draws at any batch size
                images = self._call(prompts, seeds, s)
            except (AttributeError, TypeError, ValueError) as e:
                if "generator" not in str(e) and "device" not in str(e):
                    raise
                self.per_image = True  # e.g. aMUSEd's scheduler takes one generator for the whole batch
        if self.per_image:
            images = np.concatenate([self._call([p], [seed], s) for p, seed in zip(prompts, seeds)])
        return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
