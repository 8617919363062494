"""The near-miss corpus: images whose caption is right in every word but whose drawing is not a clean render.

A judge trained on clean renders alone reads colour, size and place and passes malformed shapes (rings as
circles, four-lobed blobs with a hole as squares: what a GAN optimised through a CLIP drew). Each row spoils
one object of a sampled scene in one of these ways, and keeps the scene's caption:

  ring     a circle with a hole              lobed    four lobes with a hole, captioned as a square
  notched  a shape with a wedge cut out      blend    two shapes of one colour merged into one blob
  blur     the whole image strongly blurred  noise    strong per-pixel noise
  cut      the object half outside the frame extra    an extra small object the caption does not name
  aspect   the object stretched 1.7-2.3x in width or height

Row i is a pure function of (seed, i), like `example`. The shipped judge is trained with a `malformed` head
on part of this corpus (seed 0) and tested on another seed; `promptmill dataset near-miss` writes it.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from promptmill.models.shapes.scenes import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SUPERSAMPLE,
    Obj,
    Scene,
    _draw,
    caption,
    layout,
    sample_scene,
)

KINDS = ("ring", "lobed", "notched", "blend", "blur", "noise", "cut", "extra", "aspect")
VISIBLE_PX = 8  # a notch or a blended shape changes at least this many pixels of a 32 px image


def _area(big: int, draw) -> int:
    """Pixels `draw` fills on a blank mask of the supersampled canvas."""
    m = Image.new("L", (big, big), 0)
    draw(ImageDraw.Draw(m))
    return int(np.count_nonzero(np.asarray(m)))


def _spoil(kind: str, d: ImageDraw.ImageDraw, o: Obj, cx: float, cy: float, r: float, big: int, bg: tuple,
           rng: random.Random) -> None:
    color = COLORS[o.color]
    if kind == "ring":
        _draw(d, o, cx, cy, r)
        k = r * rng.uniform(0.4, 0.62)
        d.ellipse([cx - k, cy - k, cx + k, cy + k], fill=bg)
    elif kind == "lobed":
        off, lobe = r * rng.uniform(0.38, 0.46), r * rng.uniform(0.5, 0.6)
        for sx in (-1, 1):
            for sy in (-1, 1):
                x, y = cx + sx * off, cy + sy * off
                d.ellipse([x - lobe, y - lobe, x + lobe, y + lobe], fill=color)
        k = r * rng.uniform(0.18, 0.28)
        d.ellipse([cx - k, cy - k, cx + k, cy + k], fill=bg)
    elif kind == "notched":
        _draw(d, o, cx, cy, r)
        for attempt in range(50):  # a notch that removes a visible share of the shape (wider each try)
            t, w = rng.uniform(0, 2 * math.pi), rng.uniform(0.35, 0.55) + 0.02 * attempt
            tip = (rng.uniform(0.0, 0.3) - 0.02 * attempt) * r
            wedge = [(cx + 1.6 * r * math.cos(t - w), cy + 1.6 * r * math.sin(t - w)),
                     (cx + 1.6 * r * math.cos(t + w), cy + 1.6 * r * math.sin(t + w)),
                     (cx + tip * math.cos(t), cy + tip * math.sin(t))]
            base = _area(big, lambda m: _draw(m, o, cx, cy, r, fill=255))
            cut = base - _area(big, lambda m: (_draw(m, o, cx, cy, r, fill=255), m.polygon(wedge, fill=0)))  # noqa: B023
            if cut >= max(0.15 * base, VISIBLE_PX * SUPERSAMPLE ** 2):
                break
        d.polygon(wedge, fill=bg)
        if rng.random() < 0.5:
            k, hx, hy = r * 0.2, cx - 0.45 * r * math.cos(t), cy - 0.45 * r * math.sin(t)
            d.ellipse([hx - k, hy - k, hx + k, hy + k], fill=bg)
    elif kind == "blend":
        for attempt in range(50):  # a second shape that visibly changes the silhouette (further out each try)
            t, other = rng.uniform(0, 2 * math.pi), replace(o, shape=rng.choice([s for s in SHAPES if s != o.shape]))
            off, k = r * (rng.uniform(0.45, 0.7) + 0.02 * attempt), r * rng.uniform(0.75, 0.95)
            ox, oy = cx + off * math.cos(t), cy + off * math.sin(t)
            base = _area(big, lambda m: _draw(m, o, cx, cy, r, fill=255))
            added = _area(big, lambda m: (_draw(m, o, cx, cy, r, fill=255), _draw(m, other, ox, oy, k, fill=255))) - base  # noqa: B023
            if added >= max(0.3 * base, VISIBLE_PX * SUPERSAMPLE ** 2):
                break
        _draw(d, o, cx, cy, r)
        _draw(d, other, ox, oy, k)
    elif kind == "cut":
        # the centre moves toward its nearest edge until 35-55 % of the shape's width lies outside
        dx, dy = cx - big / 2, cy - big / 2
        if abs(dx) < 1 and abs(dy) < 1:
            dx, dy = rng.choice([(1, 0), (-1, 0), (0, 1), (0, -1)])
        inside = r * rng.uniform(-0.1, 0.3)  # centre's distance inside the edge, in radii
        if abs(dx) >= abs(dy):
            cx = big - inside if dx > 0 else inside
        else:
            cy = big - inside if dy > 0 else inside
        _draw(d, o, cx, cy, r)
    elif kind == "aspect":
        a = rng.uniform(1.7, 2.3) ** (0.5 if rng.random() < 0.5 else -0.5)  # width / height = a^2, area kept
        _draw(d, o, cx, cy, r, a, 1 / a)
    else:
        _draw(d, o, cx, cy, r)


def near_miss(index: int, seed: int = 0, size: int = 32, split: str = "full") -> tuple[str, Scene, str, np.ndarray]:
    """(kind, scene the caption states, caption, image) for row `index`; `split` as in `sample_scene` (the
    GAN's D takes train-split near misses as fakes, so it never sees a held-out colour-shape pair)."""
    rng = random.Random(f"{seed}/near-miss/{index}")
    kind = KINDS[index % len(KINDS)]
    scene = sample_scene(rng, split)
    spoilt = rng.randrange(len(scene.objects))
    if kind in ("ring", "lobed"):  # what the caption claims the blob is
        objs = list(scene.objects)
        objs[spoilt] = replace(objs[spoilt], shape="circle" if kind == "ring" else "square")
        scene = Scene(tuple(objs), scene.background, scene.position, scene.relation)
    big = size * SUPERSAMPLE
    bg = BACKGROUNDS[scene.background]
    img = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(img)
    placed = layout(scene, big, rng)
    for i, (o, cx, cy, r) in enumerate(placed):
        _spoil(kind if i == spoilt else "", d, o, cx, cy, r, big, bg, rng)
    if kind == "extra":
        used = {scene.background, *(o.color for o in scene.objects)}
        color = COLORS[rng.choice([c for c in COLORS if c not in used])]
        k = big * rng.uniform(0.06, 0.085)
        for _ in range(100):  # a free spot: clear of every object, inside the frame
            x, y = rng.uniform(k + 2, big - k - 2), rng.uniform(k + 2, big - k - 2)
            if all(math.hypot(x - cx, y - cy) > 1.3 * r + k for _, cx, cy, r in placed):
                break
        d.ellipse([x - k, y - k, x + k, y + k], fill=color)
    if kind == "blur":
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(1.3, 2.0) * SUPERSAMPLE))
    out = np.asarray(img.resize((size, size), Image.BOX))
    if kind == "noise":
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(45, 70), out.shape)
        out = np.clip(out + noise, 0, 255).round().astype(np.uint8)
    return kind, scene, caption(scene, rng), out
