"""Judge: attribute classifier for the shapes domain, trained on real renders and the near-miss corpus.

It is the domain's evaluator (prompt-match) and its penultimate layer is the feature space for FID / KID /
precision-recall, since Inception weights cannot be fetched here. Predicts the canonical scene
(see `Scene.canonical`): object count, background, per-slot shape/colour/size, position or relation; with
`malformed` (the shipped judge) also whether the drawing is a near miss (a ring, lobes, a notch, a blend, blur,
noise, a cut, an extra object, a wrong aspect: `models/shapes/near_miss.py`), which fails `prompt_match` whatever
the attributes read. `prompt_match` also needs the non-learned geometry check (`models/shapes/geometry.py`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from promptmill.models.checkpoint import load_module
from promptmill.models.images import as_model_input, to_nhwc
from promptmill.models.shapes.geometry import Geometry, geometry_matches, read_geometry
from promptmill.models.shapes.scenes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Obj, Scene, matches, parse

CANON_RELATIONS = ["left of", "above"]
HEADS = {"count": 2, "background": len(BACKGROUNDS), "position": len(POSITIONS), "relation": len(CANON_RELATIONS),
         **{f"{k}{i}": n for i in (0, 1) for k, n in (("shape", len(SHAPES)), ("color", len(COLORS)), ("size", len(SIZES)))}}
_VOCAB = {"background": list(BACKGROUNDS), "position": POSITIONS, "relation": CANON_RELATIONS,
          "shape": SHAPES, "color": list(COLORS), "size": SIZES}
IGNORE = -100


@dataclass
class JudgeConfig:
    width: int = 32
    features: int = 128
    image_size: int = 32
    malformed: bool = False  # a near-miss head (judges before it had none and load unchanged)


class Judge(nn.Module):
    def __init__(self, cfg: JudgeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        layers: list[nn.Module] = []
        chans = [3, w, 2 * w, 4 * w, 4 * w]
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, 1 if i == 0 else 2, 1), nn.BatchNorm2d(chans[i + 1]), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        side = cfg.image_size // 8
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * side * side, cfg.features), nn.ReLU())
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.features, n) for k, n in self.head_sizes.items()})
        self.num_features = cfg.features  # torchmetrics' custom feature extractors read this
        # set from real renders when the recipe exports (`calibrate`); travels in config.json
        self.calibration: dict[str, float] = {}

    @property
    def head_sizes(self) -> dict[str, int]:
        return {**HEADS, **({"malformed": 2} if self.cfg.malformed else {})}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) or float in [-1, 1] -> (N, features) penultimate activations."""
        return self.fc(self.conv(as_model_input(images, self.cfg.image_size)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: h(f) for k, h in self.heads.items()}

    def loss(self, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        return heads_loss(self(images), labels)

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> Reading:
        """The canonical scene the judge sees in each image, whether it sees a near miss (False without the
        head), and its features (one forward pass for all three)."""
        f = self.features(images)
        pred = {k: h(f).argmax(-1).tolist() for k, h in self.heads.items() if k != "malformed"}
        if "malformed" in self.heads:  # its threshold is calibrated: real renders must not be called near misses
            p = self.heads["malformed"](f).softmax(-1)[:, 1]
            pred["malformed"] = (p > self.calibration.get("malformed_threshold", 0.5)).tolist()
        scenes = []
        for i in range(images.size(0)):
            n = pred["count"][i] + 1
            objs = tuple(Obj(SHAPES[pred[f"shape{s}"][i]], list(COLORS)[pred[f"color{s}"][i]], SIZES[pred[f"size{s}"][i]])
                         for s in range(n))
            scenes.append(Scene(objs, list(BACKGROUNDS)[pred["background"][i]],
                                POSITIONS[pred["position"][i]] if n == 1 else None,
                                CANON_RELATIONS[pred["relation"][i]] if n == 2 else None))
        return Reading(scenes, [bool(m) for m in pred.get("malformed", [0] * len(scenes))], f)

    def config(self) -> dict:
        return {"family": "judge", "config": asdict(self.cfg), "calibration": self.calibration}


def heads_loss(logits: dict[str, torch.Tensor], labels: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed cross-entropy of every head some row has a label for (IGNORE elsewhere)."""
    return sum(F.cross_entropy(out, labels[k], ignore_index=IGNORE) for k, out in logits.items()
               if (labels[k] != IGNORE).any())


@dataclass
class Reading:
    scenes: list[Scene]
    malformed: list[bool]
    features: torch.Tensor  # (N, features)


def labels(scenes: list[Scene], near_miss: list[bool] | None = None) -> dict[str, torch.Tensor]:
    """Canonical scenes -> one integer label per head (IGNORE where a head does not apply). A near miss is
    labelled malformed and nothing else: its caption's attributes are not what it shows."""
    near_miss = near_miss or [False] * len(scenes)
    rows: dict[str, list[int]] = {k: [] for k in HEADS}
    for s, bad in zip(scenes, near_miss):
        if bad:
            for k in HEADS:
                rows[k].append(IGNORE)
            continue
        s = s.canonical()
        n = len(s.objects)
        rows["count"].append(n - 1)
        rows["background"].append(_VOCAB["background"].index(s.background))
        rows["position"].append(POSITIONS.index(s.position) if n == 1 else IGNORE)
        rows["relation"].append(CANON_RELATIONS.index(s.relation) if n == 2 else IGNORE)
        for slot in (0, 1):
            o = s.objects[slot] if slot < n else None
            for k in ("shape", "color", "size"):
                rows[f"{k}{slot}"].append(_VOCAB[k].index(getattr(o, k)) if o else IGNORE)
    return {**{k: torch.tensor(v) for k, v in rows.items()}, "malformed": torch.tensor([int(b) for b in near_miss])}


def stated_labels(prompts: list[str]) -> dict[str, torch.Tensor]:
    """What each prompt states, as `labels` targets, IGNORE where it states nothing (an unstated background or
    size is the generator's choice) and for every head of a prompt outside the grammar."""
    rows: dict[str, list[int]] = {k: [] for k in HEADS}
    for prompt in prompts:
        p = parse(prompt)
        p = p.canonical() if p is not None else None
        n = len(p.objects) if p is not None else 0
        value: dict[str, str | int | None] = dict.fromkeys(HEADS)
        if p is not None:
            value.update(count=n - 1, background=p.background, position=p.position if n == 1 else None,
                         relation=p.relation if n == 2 else None)
            value.update({f"{k}{slot}": o[k] for slot, o in enumerate(p.objects) for k in ("shape", "color", "size")})
        for k, v in value.items():
            rows[k].append(IGNORE if v is None else v if k == "count" else _VOCAB[k.rstrip("01")].index(v))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in rows.items()}


@dataclass
class Verdict:
    """What the scorers read in one image: the judge's scene, its near-miss flag, the geometry, and whether the
    image matches its prompt (None outside the shapes grammar)."""

    scene: Scene
    malformed: bool
    geometry: Geometry | None
    match: bool | None
    features: torch.Tensor  # the judge's penultimate features: diversity and near-duplicates are measured there

    def judged(self) -> dict:
        return {**self.scene.to_dict(), "malformed": self.malformed}


def judge_prompts(judge: Judge, images: torch.Tensor, prompts: list[str]) -> list[Verdict]:
    """`prompt_match` = the judge reads every attribute the prompt states, sees no near miss, and the geometry check
    finds whole objects that agree (None when the prompt is outside the shapes grammar: no geometry either)."""
    read = [judge.read(images[i:i + 512]) for i in range(0, len(prompts), 512)]
    scenes = [s for r in read for s in r.scenes]
    malformed = [m for r in read for m in r.malformed]
    features = torch.cat([r.features for r in read]) if read else torch.zeros(0, judge.num_features)
    if images.dtype != torch.uint8:  # [-1, 1] floats, as in training
        images = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    pixels = to_nhwc(images)
    out = []
    for i, (p, s, bad) in enumerate(zip(prompts, scenes, malformed)):
        parsed = parse(p)
        if parsed is None:
            out.append(Verdict(s, bad, None, None, features[i]))
            continue
        geo = read_geometry(pixels[i])
        ok = matches(parsed, s) and not bad and geometry_matches(parsed, geo)
        out.append(Verdict(s, bad, geo, ok, features[i]))
    return out


def pairwise_cosine(f: np.ndarray) -> np.ndarray:
    """(k, d) features -> (k, k) cosine distances: the judge's feature space, where diversity is measured."""
    u = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return np.clip(1.0 - u @ u.T, 0.0, 2.0)


def scene_from_dict(d: dict) -> Scene:
    return Scene(tuple(Obj(**o) for o in d["objects"]), d["background"], d.get("position"), d.get("relation"))


def load_judge(url: str, device: torch.device | str = "cpu", storage_options: dict | None = None) -> Judge:
    """A judge checkpoint directory, in eval mode on `device`."""
    config, judge = load_module(url, "judge", lambda c: Judge(JudgeConfig(**c["config"])), storage_options)
    judge.calibration = dict(config.get("calibration") or {})
    return judge.to(device)
