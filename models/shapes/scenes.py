"""The shapes domain: procedural, compositional scenes with captions, and the parser back to attributes.

"a small red circle on the left", "big blue square above a green triangle, on a black background".
Captions and parser come from the same phrase tables, so every caption the generator writes parses back
to its scene. Held-out colour-shape pairs never occur in the train split and are built into the test one.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ["circle", "square", "triangle", "diamond"]
COLORS = {"red": (230, 25, 25), "orange": (255, 140, 0), "yellow": (250, 225, 0), "green": (20, 170, 40),
          "blue": (30, 70, 235), "purple": (145, 35, 205), "white": (245, 245, 245), "black": (12, 12, 12)}
BACKGROUNDS = {"black": (12, 12, 12), "white": (245, 245, 245), "gray": (128, 128, 128)}
SIZES = ["small", "large"]
POSITIONS = ["left", "right", "top", "bottom", "center"]
RELATIONS = ["left of", "right of", "above", "below"]
HELD_OUT = {("blue", "triangle"), ("yellow", "circle"), ("green", "square")}

SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
POSITION_WORDS = {
    "left": ["on the left", "at the left", "on the left side", "to the left", "left side"],
    "right": ["on the right", "at the right", "on the right side", "to the right", "right side"],
    "top": ["at the top", "on top", "near the top", "top"],
    "bottom": ["at the bottom", "on the bottom", "near the bottom", "bottom"],
    "center": ["in the center", "in the middle", "at the center", "centered"],
}
RELATION_WORDS = {"left of": ["left of", "to the left of", "on the left of"],
                  "right of": ["right of", "to the right of", "on the right of"],
                  "above": ["above", "over", "on top of"], "below": ["below", "under", "beneath"]}
# variants the parser also reads (prompts people write), never written into captions: the train split stays as it is
POSITION_VARIANTS = {
    "left": ["in the left", "at left", "on left", "toward the left", "towards the left", "on the left-hand side"],
    "right": ["in the right", "at right", "on right", "toward the right", "towards the right", "on the right-hand side"],
    "top": ["on the top", "in the top", "up top", "at top", "top side", "on the top side", "toward the top",
            "towards the top"],
    "bottom": ["in the bottom", "at bottom", "bottom side", "on the bottom side", "toward the bottom",
               "towards the bottom", "down at the bottom"],
    "center": ["in the centre", "at the centre", "centred", "in the center of the image", "in the middle of the image"],
}
RELATION_VARIANTS = {"left of": [], "right of": [], "above": ["atop"], "below": ["underneath"]}
PREFIXES = ["", "a picture of ", "an image of ", "a drawing of "]
BG_FORMS = [" on a {bg} background", ", on a {bg} background", " with a {bg} background", ", {bg} background"]


@dataclass(frozen=True)
class Obj:
    shape: str
    color: str
    size: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    position: str | None = None  # one object
    relation: str | None = None  # two objects: objects[0] <relation> objects[1]

    def canonical(self) -> Scene:
        """One reading per image: 'right of' / 'below' become 'left of' / 'above' with the objects swapped."""
        flip = {"right of": "left of", "below": "above"}
        if self.relation in flip:
            return Scene(self.objects[::-1], self.background, None, flip[self.relation])
        return self

    @property
    def held_out(self) -> bool:
        return any((o.color, o.shape) in HELD_OUT for o in self.objects)

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects], "background": self.background,
                "position": self.position, "relation": self.relation}


@dataclass
class Parsed:
    """What a prompt states; None fields are unstated (a prompt need not name every attribute)."""

    objects: list[dict] = field(default_factory=list)  # each {shape, color|None, size|None}
    position: str | None = None
    relation: str | None = None
    background: str | None = None

    def canonical(self) -> Parsed:
        flip = {"right of": "left of", "below": "above"}
        if self.relation in flip:
            return Parsed(self.objects[::-1], None, flip[self.relation], self.background)
        return self


# ---------------------------------------------------------------- sampling and captions

SPLITS = ("train", "test", "full")


def sample_scene(rng: random.Random, split: str = "train") -> Scene:
    """Train never holds a held-out pair; test holds one in about half of its scenes; full (the judge's
    training data: an evaluator must know every combination) samples the whole domain."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    want_held = split == "test" and rng.random() < 0.5
    while True:
        bg = rng.choice(list(BACKGROUNDS))
        n = rng.choice([1, 2])
        objs = tuple(Obj(rng.choice(SHAPES), rng.choice([c for c in COLORS if c != bg]), rng.choice(SIZES))
                     for _ in range(n))
        scene = Scene(objs, bg, rng.choice(POSITIONS) if n == 1 else None, rng.choice(RELATIONS) if n == 2 else None)
        if split == "train" and scene.held_out:
            continue
        if split == "test" and scene.held_out != want_held:
            continue
        return scene


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _obj_phrase(o: Obj, rng: random.Random, article: bool) -> str:
    words = f"{rng.choice(SIZE_WORDS[o.size])} {o.color} {o.shape}"
    return f"{_article(words)} {words}" if article else words


def caption(scene: Scene, rng: random.Random) -> str:
    article = rng.random() < 0.75
    prefix = rng.choice(PREFIXES) if article else ""
    first = _obj_phrase(scene.objects[0], rng, article)
    if scene.relation is None:
        pos = rng.choice(POSITION_WORDS[scene.position])
        text = f"{first} {pos}" if " " in pos or pos == "centered" else f"{first}, {pos}"
    else:
        text = f"{first} {rng.choice(RELATION_WORDS[scene.relation])} {_obj_phrase(scene.objects[1], rng, True)}"
    if rng.random() < 0.5:
        text += rng.choice(BG_FORMS).format(bg=scene.background)
    return prefix + text


def binding_swaps(text: str) -> dict[str, str]:
    """{kind: the caption with the two objects' colour, shape or size words swapped}, for each kind the two
    objects differ in: same words, other scene. Contrastive training needs these to bind attributes to objects:
    without shape and size swaps the shipped CLIP told "a red circle left of a blue square" from "a red square
    left of a blue circle" for 68 % of real renders and size swaps for 47 % (chance); colour swaps 100 %."""
    toks = re.split(r"(\W+)", text)
    if sum(t.lower() in SHAPES for t in toks) < 2:
        return {}  # one object: its colour and the background's are not a pair to swap
    size_of = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
    value = {"color": lambda w: w if w in COLORS else None, "shape": lambda w: w if w in SHAPES else None,
             "size": size_of.get}
    out = {}
    for kind, of in value.items():
        at = [i for i, t in enumerate(toks) if of(t.lower())][:2]  # objects come before any background word
        if len(at) == 2 and of(toks[at[0]].lower()) != of(toks[at[1]].lower()):
            swapped = list(toks)
            swapped[at[0]], swapped[at[1]] = toks[at[1]], toks[at[0]]
            out[kind] = "".join(swapped)
    return out


def hard_negatives(text: str, rng: random.Random) -> list[str]:
    """`hard_negative` and every `binding_swaps` caption: the captions an image of `text` must score below.
    One drawn swap in two (as `hard_negative` once drew colour swaps alone) did not teach binding in 2,500 steps:
    that CLIP was at chance for colour, shape and size swaps alike."""
    one = hard_negative(text, rng)
    return ([one] if one else []) + [t for _, t in sorted(binding_swaps(text).items())]


def hard_negative(text: str, rng: random.Random) -> str | None:
    """The caption with one attribute changed (a colour, shape, size or direction word), so it describes
    another scene; None when it names no domain word. Random captions differ in many attributes and teach a
    bag of words."""
    toks = re.split(r"(\W+)", text)
    kinds = {"color": list(COLORS) + list(BACKGROUNDS), "shape": SHAPES,
             "size": [w for ws in SIZE_WORDS.values() for w in ws]}
    found = [(i, k) for i, t in enumerate(toks) for k, vs in kinds.items() if t.lower() in vs]
    found += [(i, "dir") for i, t in enumerate(toks) if t.lower() in _OPPOSITE]
    if not found:
        return None
    i, kind = rng.choice(found)
    word = toks[i].lower()
    if kind == "dir":
        toks[i] = _OPPOSITE[word]
    elif kind == "size":
        small = word in SIZE_WORDS["small"]
        toks[i] = rng.choice(SIZE_WORDS["large" if small else "small"])
    else:
        toks[i] = rng.choice([v for v in kinds[kind] if v != word])
    return "".join(toks)


_OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below",
             "below": "above", "over": "under", "under": "over", "beneath": "over"}


# ---------------------------------------------------------------- parser

def _alt(words) -> str:
    return "|".join(sorted((re.escape(w) for w in words), key=len, reverse=True))


_SIZE_OF = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
_POS_OF = {w: p for table in (POSITION_WORDS, POSITION_VARIANTS) for p, ws in table.items() for w in ws}
_REL_OF = {w: r for table in (RELATION_WORDS, RELATION_VARIANTS) for r, ws in table.items() for w in ws}


def _obj_re(i: int) -> str:
    return (rf"(?:(?:a|an|one)\s+)?(?:(?P<size{i}>{_alt(_SIZE_OF)})\s+)?(?:(?P<color{i}>{_alt(COLORS)})\s+)?"
            rf"(?P<shape{i}>{_alt(SHAPES)})")


_PARSE = re.compile(
    rf"^(?:(?:{_alt(p.strip() for p in PREFIXES if p)})\s+)?{_obj_re(0)}"
    rf"(?:(?:\s*,\s*|\s+)(?P<pos>{_alt(_POS_OF)})|\s+(?P<rel>{_alt(_REL_OF)})\s+{_obj_re(1)})?"
    rf"(?:\s*,?\s*(?:(?:on|with)\s+a\s+)?(?P<bg>{_alt(BACKGROUNDS)})\s+background)?\s*\.?$"
)


def parse(prompt: str) -> Parsed | None:
    """Attributes an in-domain prompt states; None for anything outside the shapes grammar."""
    m = _PARSE.match(" ".join(str(prompt).lower().split()))
    if m is None:
        return None
    g = m.groupdict()
    objs = [{"shape": g[f"shape{i}"], "color": g[f"color{i}"], "size": _SIZE_OF.get(g[f"size{i}"] or "")}
            for i in (0, 1) if g.get(f"shape{i}")]
    return Parsed(objs, _POS_OF.get(g["pos"] or ""), _REL_OF.get(g["rel"] or ""), g["bg"])


def stated(parsed: Parsed) -> list[str]:
    """The attributes a prompt states, by name: "count", "relation" or "position", "background", then per
    object slot (canonical order) "shape0", "color1", ...; the names `mismatches` reports."""
    p = parsed.canonical()
    scene = [k for k in ("relation", "position", "background") if getattr(p, k) is not None]
    return ["count", *scene, *(f"{k}{i}" for i, o in enumerate(p.objects) for k, v in o.items() if v is not None)]


def _value(s: Parsed | Scene, key: str) -> str | None:
    if not key[-1].isdigit():
        return getattr(s, key)
    o = s.objects[int(key[-1])]
    return o[key[:-1]] if isinstance(o, dict) else getattr(o, key[:-1])


def mismatches(parsed: Parsed, judged: Scene) -> list[str]:
    """The stated attributes the judge reads otherwise (names as in `stated`); empty when the image matches."""
    p, j = parsed.canonical(), judged.canonical()
    if len(p.objects) != len(j.objects):
        return ["count"]
    return [k for k in stated(p)[1:] if _value(p, k) != _value(j, k)]


def matches(parsed: Parsed, judged: Scene) -> bool:
    """Every attribute the prompt states equals the judge's reading of the image."""
    return not mismatches(parsed, judged)


# ---------------------------------------------------------------- rendering

_CENTERS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73), "center": (0.5, 0.5)}
_REL_CENTERS = {"left of": ("left", "right"), "right of": ("right", "left"), "above": ("top", "bottom"),
                "below": ("bottom", "top")}
_SCALE = {1: {"small": 0.26, "large": 0.48}, 2: {"small": 0.22, "large": 0.38}}
SUPERSAMPLE = 4


def _draw(d: ImageDraw.ImageDraw, o: Obj, cx: float, cy: float, r: float, sx: float = 1.0, sy: float = 1.0,
          fill: tuple[int, int, int] | None = None) -> None:
    """One shape at (cx, cy) with radius r; sx, sy stretch it (the near-miss corpus's wrong aspects)."""
    color = fill or COLORS[o.color]
    rx, ry = r * sx, r * sy
    if o.shape == "circle":
        d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=color)
    elif o.shape == "square":
        d.rectangle([cx - rx * 0.9, cy - ry * 0.9, cx + rx * 0.9, cy + ry * 0.9], fill=color)
    elif o.shape == "triangle":
        d.polygon([(cx, cy - ry), (cx + rx * 1.05, cy + ry * 0.8), (cx - rx * 1.05, cy + ry * 0.8)], fill=color)
    elif o.shape == "diamond":
        d.polygon([(cx, cy - ry * 1.1), (cx + rx * 0.8, cy), (cx, cy + ry * 1.1), (cx - rx * 0.8, cy)], fill=color)
    else:
        raise ValueError(f"unknown shape {o.shape!r}")


def layout(scene: Scene, big: int, rng: random.Random | None = None) -> list[tuple[Obj, float, float, float]]:
    """(object, cx, cy, r) in pixels of a `big` canvas; `rng` adds small jitter (three draws per object)."""
    n = len(scene.objects)
    slots = [scene.position] if n == 1 else list(_REL_CENTERS[scene.relation])
    out = []
    for o, slot in zip(scene.objects, slots):
        fx, fy = _CENTERS[slot]
        j = (lambda: rng.uniform(-0.03, 0.03)) if rng else (lambda: 0.0)
        r = _SCALE[n][o.size] * big / 2 * (1 + (rng.uniform(-0.08, 0.08) if rng else 0))
        cx = (fx + j()) * big
        out.append((o, cx, (fy + j()) * big, r))
    return out


def render(scene: Scene, size: int = 32, rng: random.Random | None = None) -> np.ndarray:
    """(size, size, 3) uint8, drawn at 4x and box-filtered down (antialiasing); `rng` adds small jitter."""
    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    d = ImageDraw.Draw(img)
    for o, cx, cy, r in layout(scene, big, rng):
        _draw(d, o, cx, cy, r)
    return np.asarray(img.resize((size, size), Image.BOX))


def example(index: int, seed: int, split: str, size: int = 32) -> tuple[Scene, str, np.ndarray]:
    """Row `index` of a split: a pure function of (seed, split, index), so shards render independently."""
    rng = random.Random(f"{seed}/{split}/{index}")
    scene = sample_scene(rng, split)
    return scene, caption(scene, rng), render(scene, size, rng)
