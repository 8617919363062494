"""The seam between the generate job and the models: `load_generator(url).generate(prompts, seeds, **sampling)`.

Families are plugins: a class registered under the entry-point group `promptmill.generators` (ours register
there too, in pyproject.toml), so a team ships its own family in its own package and names it in a spec. The
checkpoint's `family` (or the spec's) picks the class; adding a family never touches the pipeline.

The contract (`Generator`): `family`, a pydantic `Sampling` model (validated in preflight), `height`/`width`,
and `generate(prompts, seeds, **sampling) -> uint8 (N, H, W, 3)` whose image i depends only on (prompts[i],
seeds[i], sampling): the same pixels at any batch size and on any actor, which resume and rerank rely on. To the
bit on CPU; on CUDA kernels may differ by batch size, and a 300M Transformer in bf16 on an H200 drew pixels within
1 level of 255 of its one-batch bare draw (docs/benchmarks.md, "On a GPU").
A checkpoint may recommend its sampling (config.json `sampling`, as Hugging Face's generation_config.json): a
generator's `sampling_defaults`, under whatever a caller sets, key by key (`resolved_sampling`).
Loading: either our checkpoint format (`from_config` + `from_checkpoint`, config.json + model.safetensors) or
the family's own `load(url, device, storage_options)` classmethod for any other layout.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from promptmill.models.checkpoint import CheckpointError, load_checkpoint, meta_shapes, open_checkpoint
from promptmill.models.families import generator_class
from pydantic import BaseModel, ValidationError


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


def load_generator(
    url: str, device: str | torch.device | None = None, storage_options: dict | None = None,
    family: str | None = None, **load_options: Any,
) -> Generator:
    """Load a checkpoint (local path or fsspec URL) onto `device` (default: CUDA if present). `family` (the
    spec's) picks a plugin's own loader for its own layout; our layout names its family in config.json, and its
    weights' names and shapes are checked against what the config builds before any weight is read."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    own = _own_layout(family)
    if own is not None:  # `load_options` (precision, variant) go to a loader that names them
        accepted = inspect.signature(own.load).parameters
        return own.load(url, device, storage_options, **{k: v for k, v in load_options.items() if k in accepted})

    config, tensors = load_checkpoint(url, storage_options, expect=_expected(url))  # config.json read once
    cls = generator_class(config["family"])
    recommended = _recommended(url, cls, config)
    try:
        gen = cls.from_checkpoint(config, tensors, device)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:  # config and weights disagree
        raise CheckpointError(f"checkpoint {url!r}: weights do not match config.json ({e})") from e
    gen.sampling_defaults = recommended  # any family in our layout, a plugin's too
    return gen


def _recommended(url: str, cls: Any, config: dict) -> dict[str, Any]:
    try:
        return sampling_defaults(cls, config)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {url!r}: {e}") from e


def _expected(url: str):
    def expect(config: dict):  # the class its config names, built on the meta device
        try:
            cls = generator_class(config["family"])
        except ValueError as e:  # an unknown family
            raise CheckpointError(f"checkpoint {url!r}: {e}") from e
        return meta_shapes(lambda: cls.from_config(config, torch.device("meta")))
    return expect


def _own_layout(family: str | None) -> Any:
    """The class of the spec's `family` when it loads a layout of its own (a `load` classmethod), else None."""
    if family is None:
        return None
    try:
        cls = generator_class(family)
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    return cls if hasattr(cls, "load") else None


def check_checkpoint(url: str, storage_options: dict | None = None, family: str | None = None) -> Any:
    """What preflight needs of a checkpoint (its `family` and `Sampling`), picked as `load_generator` picks: a
    family with a layout of its own is loaded, on CPU, once, as its actors will; ours gets every check
    `load_generator` makes before it reads a weight (`checkpoint.open_checkpoint`) and returns its class, so the
    driver does not load (or download) the weights."""
    own = _own_layout(family)
    if own is not None:
        return own.load(url, torch.device("cpu"), storage_options)
    config, _, _ = open_checkpoint(url, storage_options, expect=_expected(url))
    cls = generator_class(config["family"])
    _recommended(url, cls, config)
    return cls


def check_inputs(prompts: list[str], seeds: list[int]) -> None:
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} is {type(p).__name__}, not str: {p!r}")


def sampling_defaults(cls: Any, config: dict) -> dict[str, Any]:
    """config.json's `sampling`, the checkpoint's recommended settings, checked by the family's `Sampling` model;
    {} where it recommends none. A ValueError names the field (the loaders turn it into a CheckpointError)."""
    raw = config.get("sampling") or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config.json sampling: an object of {cls.family} sampling settings, not {raw!r}")
    try:
        return cls.Sampling(**raw).model_dump(exclude_unset=True)
    except ValidationError as e:
        raise ValueError(f"config.json sampling: {e}") from e


def resolved_sampling(gen: Any, sampling: dict[str, Any]) -> BaseModel:
    """What a draw uses: the checkpoint's `sampling_defaults` (none for a family without them), `sampling` over
    them key by key (an explicit null turns a recommended setting off)."""
    return gen.Sampling(**{**getattr(gen, "sampling_defaults", {}), **sampling})
