"""An aesthetic score from CLIP image embeddings: a LAION-style predictor (a small MLP), user-supplied.

The LAION improved aesthetic predictor is five linear layers with dropout between the first four, no
activation, on L2-normalised CLIP ViT-L/14 image embeddings (768 wide); it ships as a PyTorch pickle, which
promptmill never loads: convert it once where you trust the file,

    safetensors.torch.save_file(torch.load("sac+logos+ava1-l14-linearMSE.pth", weights_only=True), "model.safetensors")

and write `config.json` = {"family": "aesthetic", "dims": [768, 1024, 128, 64, 16, 1]} beside it. `dims` must
start at the scoring CLIP's embedding width.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np
import torch
import torch.nn as nn
from promptmill.models.errors import CheckpointError
from promptmill.models.local_cache import local_copy
from safetensors.torch import load_file


def laion_layers(dims: list[int]) -> nn.Sequential:
    """LAION's layout (`layers.0`, `.2`, `.4`, `.6`, `.7`): Linear, Dropout, ..., the last two Linear back to back."""
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        mods.append(nn.Linear(a, b))
        if i < len(dims) - 3:
            mods.append(nn.Dropout(0.2 if i < 2 else 0.1))
    return nn.Sequential(*mods)


class AestheticPredictor(nn.Module):
    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims
        self.layers = laion_layers(dims)

    @torch.no_grad()
    def forward(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        """CLIP image embeddings (N, D) -> one score each (float64)."""
        x = torch.as_tensor(np.asarray(embeddings, np.float32))
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.layers(x).squeeze(-1).double().numpy()


def load_aesthetic(url: str, storage_options: dict | None = None, width: int | None = None) -> AestheticPredictor:
    """The predictor at `url` (config.json + model.safetensors); `width`: the CLIP's embedding width it must take."""
    local = local_copy(url, storage_options)
    try:
        with fsspec.open(f"{local}/config.json", "rb") as f:
            config = json.load(f)
        dims = [int(d) for d in config["dims"]]
        if config.get("family") != "aesthetic" or len(dims) < 3 or dims[-1] != 1:
            raise ValueError("wants {\"family\": \"aesthetic\", \"dims\": [D, ..., 1]}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"aesthetic predictor {url!r}: config.json is not valid ({e})") from e
    if width is not None and dims[0] != width:
        raise CheckpointError(f"aesthetic predictor {url!r} takes {dims[0]}-wide embeddings; the scoring CLIP gives "
                              f"{width}")
    model = AestheticPredictor(dims).eval()
    try:
        model.load_state_dict(load_file(f"{local}/model.safetensors"))
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"aesthetic predictor {url!r}: model.safetensors does not match dims {dims} ({e})") from e
    return model
