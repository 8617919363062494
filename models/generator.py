"""The seam between the generate job and the models: `load_generator(url).generate(prompts, seeds, **sampling)`.

A family registers its class here by name; the checkpoint's `family` field picks it, so adding a family
never touches the pipeline.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from pydantic import BaseModel

from models.checkpoint import CheckpointError, load_checkpoint, meta_shapes

# family -> module defining `GENERATOR` (imported lazily: loading a GAN never imports the transformer)
FAMILIES: dict[str, str] = {"gan": "models.gan", "transformer": "models.transformer"}


class Generator(Protocol):
    family: ClassVar[str]
    Sampling: ClassVar[type[BaseModel]]  # pydantic model of the family's sampling parameters
    height: int
    width: int

    def generate(self, prompts: list[str], seeds: list[int], **sampling: Any) -> np.ndarray: ...

    @classmethod
    def from_config(cls, config: dict, device: torch.device) -> Generator: ...  # untrained, from config.json

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> Generator: ...


def generator_class(family: str) -> type[Generator]:
    if family not in FAMILIES:
        raise ValueError(f"unknown generator family {family!r}; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[family]).GENERATOR


def load_generator(
    url: str, device: str | torch.device | None = None, storage_options: dict | None = None
) -> Generator:
    """Load a checkpoint directory (local path or fsspec URL) onto `device` (default: CUDA if present). The
    weights' names and shapes are checked against what the config builds before any weight is read."""

    try:
        config, _ = load_checkpoint(url, storage_options, read_weights=False)
        cls = generator_class(config["family"])
    except CheckpointError:
        raise
    except ValueError as e:  # an unknown family
        raise CheckpointError(f"checkpoint {url!r}: {e}") from e
    config, tensors = load_checkpoint(
        url, storage_options, expect=lambda c: meta_shapes(lambda: cls.from_config(c, torch.device("meta"))))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        return cls.from_checkpoint(config, tensors, device)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:  # config and weights disagree
        raise CheckpointError(f"checkpoint {url!r}: weights do not match config.json ({e})") from e


def check_inputs(prompts: list[str], seeds: list[int]) -> None:
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is {type(p).__name__}, not str: {p!r}")
