"""Image arrays between storage (uint8 NHWC, encoded bytes) and torch (NCHW): one conversion each way.

Encoding lives with the output layout (`pipelines.layout`), which owns the image formats."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # the driver decodes images for its report without importing torch (1.1 s of its start-up)
    import torch


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes (any Pillow format) -> uint8 (H, W, 3)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> contiguous uint8 (N, 3, H, W); copies, since Ray hands out read-only arrays."""
    import torch

    return torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).contiguous()


def to_nhwc(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) tensor -> (N, H, W, 3) numpy array, same dtype."""
    return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()
