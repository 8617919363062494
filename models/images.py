"""Image arrays between storage (uint8 NHWC, encoded bytes) and torch (NCHW): one conversion each way.

Encoding lives with the output layout (`pipelines.layout`), which owns the image formats."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # the driver decodes images for its report without importing torch (1.1 s of its start-up)
    import torch


MAX_PIXELS = 8192 * 8192  # 2x the largest size a spec may ask for; a larger header is a decompression bomb


def decode_image(data: bytes) -> np.ndarray:
    """Encoded bytes (any Pillow format) -> uint8 (H, W, 3). The size in the header is checked before the pixels
    are decoded (a 2 KB PNG can claim 50,000 x 50,000)."""
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # Pillow's own bound (2 x 89 MP) trips first on huge claims
        raise ValueError(f"image over the {MAX_PIXELS:,}-pixel bound ({e}); refused") from None
    if im.width * im.height > MAX_PIXELS:
        raise ValueError(f"image of {im.width} x {im.height} pixels, over the {MAX_PIXELS:,}-pixel bound; refused")
    return np.asarray(im.convert("RGB"))


def by_shape(images) -> list[tuple[list[int], np.ndarray]]:
    """(row indices, uint8 (n, H, W, 3) stack) per image size, in order of first appearance: a batch may hold
    images of several models and sizes (Ray Data hands those over as an object array), and every model
    stacks images of one size only."""
    groups: dict[tuple, list[int]] = {}
    for i, im in enumerate(images):
        groups.setdefault(np.shape(im), []).append(i)
    return [(idx, np.stack([np.asarray(images[i]) for i in idx])) for idx in groups.values()]


def to_nchw(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> contiguous uint8 (N, 3, H, W); copies, since Ray hands out read-only arrays."""
    import torch

    return torch.from_numpy(np.array(images, copy=True)).permute(0, 3, 1, 2).contiguous()


def to_nhwc(images: torch.Tensor) -> np.ndarray:
    """(N, 3, H, W) tensor -> (N, H, W, 3) numpy array, same dtype."""
    return images.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def as_model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or [-1, 1] float (N, 3, H, W) -> float at the model's resolution (a 64 px generator can be judged)."""
    import torch
    import torch.nn.functional as F

    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images
