"""Image arrays between storage (uint8 NHWC, encoded bytes) and torch (NCHW): one conversion each way.

Encoding lives with the output layout (`pipelines.layout`), which owns the image formats."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes (any Pillow format) -> uint8 (H, W, 3)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> contiguous uint8 (N, 3, H, W); copies, since Ray hands out read-only arrays."""
    return torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).contiguous()


def to_nhwc(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) tensor -> (N, H, W, 3) numpy array, same dtype."""
    return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
