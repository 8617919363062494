"""Placements (named output sizes such as feed=1080x1080) and fitting an image to one: crop to fill, or pad to fit
with a colour sampled from the image's border (or given), resampled with Lanczos."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps
from promptmill.pipelines.layout import SAFE_NAME

DEFAULT_PLACEMENTS = "feed=1080x1080,link=1200x628,story=1080x1920"
FITS = ("crop", "pad")
MAX_SIDE = 8192  # no ad placement comes near; a typo such as 10800x1080 should not allocate gigabytes
RESAMPLE = Image.LANCZOS  # the high-quality filter for both up- and downscaling
SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
HEX = re.compile(r"#?([0-9a-fA-F]{6})")


@dataclass(frozen=True)
class Placement:
    name: str
    width: int
    height: int


def parse_size(name: str, text: str) -> Placement:
    m = SIZE.fullmatch(text.strip())
    if not m:
        raise ValueError(f"placement {name!r}: size {text!r} is not WIDTHxHEIGHT (e.g. 1080x1080)")
    w, h = int(m.group(1)), int(m.group(2))
    if not (1 <= w <= MAX_SIDE and 1 <= h <= MAX_SIDE):
        raise ValueError(f"placement {name!r}: {w}x{h} outside 1..{MAX_SIDE} per side")
    return Placement(name, w, h)


def parse_placements(spec: str | dict[str, str]) -> list[Placement]:
    """`feed=1080x1080,link=1200x628` (or a mapping name -> size) -> placements; a ValueError naming the bad one.
    Names become folder names, so they are path-safe names."""
    items = spec.items() if isinstance(spec, dict) else [
        tuple(p.split("=", 1)) if "=" in p else (p, "") for p in (x.strip() for x in spec.split(",")) if p]
    out: list[Placement] = []
    for name, size in items:
        if not SAFE_NAME.fullmatch(name):
            raise ValueError(f"placement name {name!r}: letters, digits, '.', '_', '-' only")
        if any(p.name == name for p in out):
            raise ValueError(f"placement {name!r} is named twice")
        out.append(parse_size(name, str(size)))
    if not out:
        raise ValueError("placements: none given (e.g. feed=1080x1080,link=1200x628)")
    return out


def parse_colour(text: str) -> tuple[int, int, int] | None:
    """'auto' -> None (sampled per image); '#RRGGBB' -> RGB; anything else a ValueError."""
    if text == "auto":
        return None
    m = HEX.fullmatch(text.strip())
    if not m:
        raise ValueError(f"pad colour {text!r}: 'auto' or #RRGGBB")
    v = m.group(1)
    return int(v[0:2], 16), int(v[2:4], 16), int(v[4:6], 16)


def border_colour(img: np.ndarray) -> tuple[int, int, int]:
    """The median colour of the image's outermost pixels: padding that continues the background."""
    edge = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]]).reshape(-1, img.shape[-1])
    return tuple(int(v) for v in np.median(edge[:, :3], axis=0))


def fit_image(img: np.ndarray, p: Placement, fit: str, pad: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (p.height, p.width, 3): `crop` fills the placement (centre crop), `pad` fits the
    whole image and fills the rest with `pad` (None: the border colour)."""
    if fit not in FITS:
        raise ValueError(f"fit {fit!r}: one of {list(FITS)}")
    im = Image.fromarray(img, "RGB")
    if fit == "crop":
        out = ImageOps.fit(im, (p.width, p.height), RESAMPLE, centering=(0.5, 0.5))
    else:
        out = ImageOps.pad(im, (p.width, p.height), RESAMPLE, color=pad or border_colour(img), centering=(0.5, 0.5))
    return np.asarray(out)
