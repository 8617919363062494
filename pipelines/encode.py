"""Image encoding (runs inside the generate actors, never in the driver)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
_SAVE_ARGS = {"png": {"format": "PNG"}, "jpeg": {"format": "JPEG", "quality": 95},
              "webp": {"format": "WEBP", "lossless": True}}


def encode_image(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, **_SAVE_ARGS[fmt])
    return buf.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
