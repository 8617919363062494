"""A non-learned reading of a shapes image, so the learned judge is never the only gate on `prompt_match`.

A judge learns whatever separates its training renders, and a generator optimised near it (the GAN through
the CLIP) finds images it misreads: rings passed as circles, four-lobed blobs with a hole as squares. This
check reads pixels with fixed rules: the background from the border, objects as connected regions that differ
from it, each object's colour (nearest palette colour), area, centroid, enclosed holes, solidity (area over
convex-hull area) and the best-fitting of the four shape templates (soft IoU, the renderer's own geometry).
An object is *whole* when it has no hole, is convex and fits its template; `geometry_matches` asks for whole
objects that agree with every attribute the prompt states.

Thresholds were set on real renders (all pass) and the near-miss corpus (`models/shapes/near_miss.py`);
`promptmill eval-models` reports both rates.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from promptmill.models.shapes.scenes import BACKGROUNDS, COLORS, SHAPES, Obj, Parsed, Scene, mismatches

FG_DISTANCE = 40.0  # RGB distance from the background that makes a pixel part of an object's region
MIN_AREA = 3.0  # objects cover at least this many pixels (in 32 px units); smaller regions are specks
MAX_SPECKS = 2  # more stray specks than this: a noisy image, no object reading is trusted
MIN_IOU = 0.72  # soft IoU with the best template; real renders >= 0.8 (see module docstring)
MIN_SOLIDITY = 0.82  # area / convex-hull area
SHAPE_MARGIN = 0.03  # a stated shape within this IoU of the best template is read as stated
MAX_HOLE = 0.5  # enclosed background, in pixels of 32 px units
SIZE_SPLIT = {1: 0.185, 2: 0.15}  # template radius / image side between small and large (shapes._SCALE / 2)
_AREA_K = {"circle": np.pi, "square": 3.24, "triangle": 1.89, "diamond": 1.76}  # area = k r^2 (shapes._draw)
_SS = 4  # supersampling of the templates


@dataclass(frozen=True)
class Blob:
    shape: str  # best-fitting template
    color: str
    size: str
    cx: float  # centroid, fraction of the image side
    cy: float
    area: float  # in pixels of a 32 px image
    holes: float
    solidity: float
    fits: dict[str, float]  # soft IoU with each shape's best template

    @property
    def iou(self) -> float:
        return self.fits[self.shape]

    @property
    def whole(self) -> bool:
        return self.holes <= MAX_HOLE and self.solidity >= MIN_SOLIDITY and self.iou >= MIN_IOU

    def reads_as(self, shape: str) -> bool:
        """The best template, or one within SHAPE_MARGIN of it (a 6 px square and circle differ by its corners)."""
        return self.fits[shape] >= max(MIN_IOU, self.iou - SHAPE_MARGIN)


@dataclass(frozen=True)
class Geometry:
    background: str
    objects: tuple[Blob, ...]
    specks: int

    @property
    def well_formed(self) -> bool:
        return 1 <= len(self.objects) <= 2 and self.specks <= MAX_SPECKS and all(b.whole for b in self.objects)

    def scene(self) -> Scene | None:
        """The reading as a scene (canonical order), None when it is not one or two objects."""
        objs = self.objects
        if not 1 <= len(objs) <= 2:
            return None
        if len(objs) == 1:
            b = objs[0]
            return Scene((Obj(b.shape, b.color, b.size),), self.background, _position(b.cx, b.cy))
        a, b = objs
        horizontal = abs(a.cx - b.cx) >= abs(a.cy - b.cy)
        return Scene(tuple(Obj(o.shape, o.color, o.size) for o in self.ordered()), self.background, None,
                     "left of" if horizontal else "above")

    def ordered(self) -> tuple[Blob, ...]:
        """Two objects in canonical order (left one first, or the upper one when they are stacked)."""
        if len(self.objects) != 2:
            return self.objects
        a, b = self.objects
        horizontal = abs(a.cx - b.cx) >= abs(a.cy - b.cy)
        return (a, b) if (a.cx < b.cx if horizontal else a.cy < b.cy) else (b, a)

    def to_dict(self) -> dict:
        return {"background": self.background, "specks": self.specks, "well_formed": self.well_formed,
                "objects": [{**{k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(b).items()},
                             "iou": round(b.iou, 3), "whole": b.whole} for b in self.objects]}


def _position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < 0.12:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> str:
    names = list(palette)
    d = ((np.array([palette[n] for n in names], float) - rgb) ** 2).sum(1)
    return names[int(d.argmin())]


def _components(mask: np.ndarray, eight: bool) -> list[np.ndarray]:
    """Connected regions of a boolean mask, each as an (n, 2) array of (y, x)."""
    h, w = mask.shape
    seen = np.zeros_like(mask)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)] + ([(-1, -1), (-1, 1), (1, -1), (1, 1)] if eight else [])
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        todo, pts = deque([(y0, x0)]), []
        while todo:
            y, x = todo.popleft()
            pts.append((y, x))
            for dy, dx in steps:
                ny, nx = y + dy, x + dx
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    todo.append((ny, nx))
        out.append(np.array(pts))
    return out


def _mask(pts: np.ndarray, h: int, w: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[tuple(pts.T)] = True
    return m


def _holes(obj: np.ndarray) -> int:
    """Pixels outside the object that the outside cannot reach (4-connected background, 8-connected object)."""
    free = np.pad(~obj, 1, constant_values=True)
    reach = np.zeros_like(free)
    reach[0, :] = reach[-1, :] = reach[:, 0] = reach[:, -1] = True
    while True:  # flood from the frame, vectorised
        grown = reach.copy()
        grown[1:] |= reach[:-1]
        grown[:-1] |= reach[1:]
        grown[:, 1:] |= reach[:, :-1]
        grown[:, :-1] |= reach[:, 1:]
        grown &= free
        if (grown == reach).all():
            return int((free & ~reach).sum())
        reach = grown


def _solidity(mask: np.ndarray) -> float:
    """Object pixels / pixels whose centres lie in the convex hull of the object's pixel centres: 1 for a digitised
    convex shape, less for rings, lobes and notches."""
    rows = np.nonzero(mask.any(1))[0]
    if len(rows) == 0:
        return 1.0
    ends = [(float(x), float(y)) for y in rows for x in (np.nonzero(mask[y])[0][[0, -1]])]  # enough for the hull
    pts = sorted(set(ends))
    if len(pts) < 3:
        return 1.0

    def half(points):
        chain: list = []
        for x, y in points:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (y - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (x - chain[-2][0])) <= 0:
                chain.pop()
            chain.append((x, y))
        return chain[:-1]

    hull = np.array(half(pts) + half(pts[::-1]))
    if len(hull) < 3:
        return 1.0
    ys, xs = np.nonzero(mask)
    gy, gx = np.mgrid[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    edges = np.roll(hull, -1, 0) - hull
    cross = (edges[:, 0] * (gy.reshape(-1, 1) - hull[:, 1]) - edges[:, 1] * (gx.reshape(-1, 1) - hull[:, 0]))
    inside = (cross >= -1e-9).all(1)
    return float(mask.sum() / max(inside.sum(), 1))


def _inside(shape: str, x: np.ndarray, y: np.ndarray, cx, cy, r) -> np.ndarray:
    """The renderer's shapes (shapes._draw) as inside tests, broadcast over candidate (cx, cy, r)."""
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.9 * r) & (np.abs(dy) <= 0.9 * r)
    if shape == "diamond":
        return np.abs(dx) / (0.8 * r) + np.abs(dy) / (1.1 * r) <= 1
    # triangle: apex (0, -r), base corners (+-1.05 r, 0.8 r)
    return (dy <= 0.8 * r) & (np.abs(dx) * 1.8 <= 1.05 * (dy + r))


def _coverage(inside: np.ndarray, ph: int, pw: int) -> np.ndarray:
    """(..., ph * _SS, pw * _SS) booleans -> each pixel's share of inside sub-samples, as `.mean` over the two
    sub-sample axes gives it to the bit. Counted by adding uint8 slices: numpy's float reduction over two strided
    axes was 60 % of the scorers' time, and read_geometry ran at half the speed it does now."""
    y = inside.view(np.uint8).reshape(*inside.shape[:-2], ph, _SS, pw, _SS)
    cols = sum(y[..., k] for k in range(1, _SS)) + y[..., 0]
    return (sum(cols[..., k, :] for k in range(1, _SS)) + cols[..., 0, :]) / (_SS * _SS)


def _fit(alpha: np.ndarray, pts: np.ndarray) -> dict[str, tuple[float, float]]:
    """{shape: (soft IoU, radius in px)} of each shape's best template in a small search around the area/centroid
    fit."""
    h, w = alpha.shape
    y0, x0 = np.maximum(pts.min(0) - 2, 0)
    y1, x1 = np.minimum(pts.max(0) + 3, (h, w))
    patch = alpha[y0:y1, x0:x1]
    ph, pw = patch.shape
    sub = (np.arange(_SS) + 0.5) / _SS
    ys = (y0 + np.arange(ph)[:, None] + sub[None, :]).reshape(-1)  # supersampled pixel centres
    xs = (x0 + np.arange(pw)[:, None] + sub[None, :]).reshape(-1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    area = patch.sum()
    gy = (patch * (y0 + np.arange(ph)[:, None] + 0.5)).sum() / area
    gx = (patch * (x0 + np.arange(pw)[None, :] + 0.5)).sum() / area
    fits = {}
    shifts = np.array([-0.5, 0.0, 0.5])
    scales = np.array([0.9, 0.95, 1.0, 1.05, 1.1])
    for shape in SHAPES:
        r0 = np.sqrt(area / _AREA_K[shape])
        cy0 = gy - (0.2 * r0 if shape == "triangle" else 0.0)
        r = (r0 * scales)[:, None, None, None, None]
        cy = (cy0 + shifts)[None, :, None, None, None]
        cx = (gx + shifts)[None, None, :, None, None]
        inside = _inside(shape, xx[None, None, None], yy[None, None, None], cx, cy, r)
        t = _coverage(inside, ph, pw)
        iou = np.minimum(t, patch).sum((-2, -1)) / np.maximum(np.maximum(t, patch).sum((-2, -1)), 1e-9)
        i = np.unravel_index(iou.argmax(), iou.shape)
        fits[shape] = (float(iou[i]), float(r0 * scales[i[0]]))
    return fits


def _blob(pts: np.ndarray, img: np.ndarray, dist: np.ndarray, bg_rgb: np.ndarray, colors: dict,
          unit: float) -> tuple[Blob, float] | None:
    """One object from its pixels (the size is set by the caller), with its template radius / image side."""
    h, w = dist.shape
    d = dist[tuple(pts.T)]
    rgb = np.median(img[tuple(pts[d >= 0.85 * d.max()].T)], 0)  # the object's own colour: its core, not its rim
    alpha = np.zeros((h, w))
    alpha[tuple(pts.T)] = np.clip(d / max(np.sqrt(((rgb - bg_rgb) ** 2).sum()), FG_DISTANCE), 0, 1)
    area = alpha.sum() * unit
    if area < MIN_AREA:
        return None
    mask = alpha >= 0.5
    fits = _fit(alpha, pts)
    shape = max(fits, key=lambda k: fits[k][0])
    blob = Blob(shape, _nearest(rgb, colors), "", float(pts[:, 1].mean() + 0.5) / w, float(pts[:, 0].mean() + 0.5) / h,
                float(area), _holes(mask) * unit, _solidity(mask), {k: round(v[0], 4) for k, v in fits.items()})
    return blob, fits[shape][1] / w


def read_geometry(image: np.ndarray) -> Geometry:
    """uint8 (H, W, 3) -> the objects a fixed-rule reading finds (sizes normalised to a 32 px image)."""
    img = np.asarray(image, float)
    h, w, _ = img.shape
    unit = (32.0 / h) * (32.0 / w)  # pixel areas in 32 px units
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg_rgb = np.median(border, 0)
    background = _nearest(bg_rgb, BACKGROUNDS)
    delta = img - bg_rgb
    dist = np.sqrt((delta ** 2).sum(-1))
    colors = {c: COLORS[c] for c in COLORS if c != background}
    axes = np.array(list(colors.values()), float) - bg_rgb  # each colour's line from the background
    a = np.einsum("hwc,kc->hwk", delta, axes) / (axes ** 2).sum(1)  # coverage if the pixel is that colour
    residual = np.linalg.norm(delta[..., None, :] - a[..., None] * axes, axis=-1)
    residual[a < 0.05] = np.inf  # on the far side of the background (black vs white on gray): not that colour
    blobs, specks = [], 0
    for region in _components(dist > FG_DISTANCE, eight=True):
        one = _blob(region, img, dist, bg_rgb, colors, unit)
        if one is None:
            specks += 1  # an isolated speck (noise), not an object
            continue
        # a region is two objects only when it is not one whole object and two colours each cover a real area
        # (touching objects); colour fringes and gradients along one object are part of it
        res = residual[tuple(region.T)]
        label = res.argmin(1)
        cover = {k: float((label == k).sum()) * unit for k in set(label.tolist())}
        major = [k for k, v in cover.items() if v >= max(MIN_AREA, 0.15 * sum(cover.values()))]
        if one[0].whole or len(major) < 2:
            blobs.append(one)
            continue
        own = np.array(major)[res[:, major].argmin(1)]
        for k in major:
            for pts in _components(_mask(region[own == k], h, w), eight=True):
                part = _blob(pts, img, dist, bg_rgb, colors, unit)
                blobs += [part] if part else []  # a sliver left by the split is dropped
    split = SIZE_SPLIT.get(len(blobs), SIZE_SPLIT[2])  # sizes are relative to the object count
    objs = tuple(Blob(**{**asdict(b), "size": "large" if r > split else "small"}) for b, r in blobs)
    return Geometry(background, objs, specks)


def geometry_scene(parsed: Parsed, geo: Geometry) -> Scene | None:
    """The geometry's scene, with a stated shape in place of the best template where it fits within SHAPE_MARGIN
    (None when it is not one or two objects)."""
    scene = geo.scene()
    if scene is None or len(scene.objects) != len(parsed.objects):
        return scene
    stated = parsed.canonical().objects
    objs = tuple(Obj(o["shape"] if o["shape"] and b.reads_as(o["shape"]) else b.shape, b.color, b.size)
                 for o, b in zip(stated, geo.ordered()))
    return Scene(objs, scene.background, scene.position, scene.relation)


def geometry_matches(parsed: Parsed, geo: Geometry) -> bool:
    """Whole objects, as many as the prompt names, and every stated attribute as the geometry reads it."""
    scene = geometry_scene(parsed, geo)
    return geo.well_formed and scene is not None and not mismatches(parsed, scene)
