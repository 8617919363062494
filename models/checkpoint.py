"""Checkpoint directories: `config.json` + `model.safetensors`, on any fsspec URL; never pickle.

config.json holds {"family": ..., "config": {...}, ...extra}; the family picks the class that rebuilds
the model (see `models.generator`). Weights are written before config.json, so a directory whose
config.json exists was completely written (S3 puts are atomic; a local crash mid-write leaves no config).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import fsspec
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or corrupt; the message names the file."""


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def save_checkpoint(
    url: str,
    tensors: dict[str, torch.Tensor],
    config: dict[str, Any],
    storage_options: dict | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Save `tensors` (a state dict) and `config`; `dtype` casts floating tensors (fp16 for shipping)."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    out = {}
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        out[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    fs.pipe(_join(path, WEIGHTS_NAME), st_save(out))
    fs.pipe(_join(path, CONFIG_NAME), json.dumps(config, indent=2, sort_keys=True).encode())


def load_checkpoint(url: str, storage_options: dict | None = None, kind: str | None = None
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Return (config, fp32 tensors); `kind`: the `family` the caller needs. Raises CheckpointError naming the file."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    cfg_path, w_path = _join(path, CONFIG_NAME), _join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not fs.exists(p):
            raise CheckpointError(f"checkpoint {url!r}: missing {p.rsplit('/', 1)[-1]}")
    try:
        config = json.loads(fs.cat_file(cfg_path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {url!r}: {CONFIG_NAME} is not valid JSON ({e})") from e
    if not isinstance(config, dict) or "family" not in config or "config" not in config:
        raise CheckpointError(f"checkpoint {url!r}: {CONFIG_NAME} lacks 'family' or 'config'")
    if kind is not None and config["family"] != kind:
        raise CheckpointError(f"checkpoint {url!r} is a {config['family']!r} checkpoint, not a {kind!r} one")
    try:
        tensors = st_load(fs.cat_file(w_path))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {url!r}: {WEIGHTS_NAME} is corrupt ({e})") from e
    return config, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def load_module(url: str, kind: str, build: Callable[[dict], torch.nn.Module], storage_options: dict | None = None
                ) -> tuple[dict, torch.nn.Module]:
    """(config, module in eval mode) for the non-generator checkpoints (judge, vq, clip): `build(config)` makes
    the module, the weights must fit it exactly; any disagreement is a CheckpointError, never a traceback."""
    config, tensors = load_checkpoint(url, storage_options, kind)
    try:
        module = build(config)
        module.load_state_dict(tensors)
    except (KeyError, RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {url!r}: weights do not match {CONFIG_NAME} ({e})") from e
    return config, module.eval()
