"""Judge: attribute classifier for the shapes domain, trained on real renders.

It is the domain's evaluator (prompt-match) and its penultimate layer is the feature space for FID / KID /
precision-recall, since Inception weights cannot be fetched here. Predicts the canonical scene
(see `Scene.canonical`): object count, background, per-slot shape/colour/size, position or relation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.checkpoint import load_module
from models.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, SIZES, Obj, Scene, matches, parse

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
        self.heads = nn.ModuleDict({k: nn.Linear(cfg.features, n) for k, n in HEADS.items()})
        self.num_features = cfg.features  # torchmetrics' custom feature extractors read this

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) or float in [-1, 1] -> (N, features) penultimate activations."""
        return self.fc(self.conv(as_model_input(images, self.cfg.image_size)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.features(images)
        return {k: h(f) for k, h in self.heads.items()}

    def loss(self, images: torch.Tensor, labels: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self(images)
        return sum(F.cross_entropy(out[k], labels[k], ignore_index=IGNORE) for k in HEADS)

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> list[Scene]:
        """The canonical scene the judge sees in each image."""
        pred = {k: v.argmax(-1).tolist() for k, v in self(images).items()}
        scenes = []
        for i in range(images.size(0)):
            n = pred["count"][i] + 1
            objs = tuple(Obj(SHAPES[pred[f"shape{s}"][i]], list(COLORS)[pred[f"color{s}"][i]], SIZES[pred[f"size{s}"][i]])
                         for s in range(n))
            scenes.append(Scene(objs, list(BACKGROUNDS)[pred["background"][i]],
                                POSITIONS[pred["position"][i]] if n == 1 else None,
                                CANON_RELATIONS[pred["relation"][i]] if n == 2 else None))
        return scenes

    def config(self) -> dict:
        return {"family": "judge", "config": asdict(self.cfg)}


def labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Canonical scenes -> one integer label per head (IGNORE where a head does not apply)."""
    rows: dict[str, list[int]] = {k: [] for k in HEADS}
    for s in scenes:
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
    return {k: torch.tensor(v) for k, v in rows.items()}


def as_model_input(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or [-1, 1] float (N, 3, H, W) -> float at the model's resolution (a 64 px generator can be judged)."""
    if images.dtype == torch.uint8:
        images = images.float() / 127.5 - 1
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images


def judge_prompts(judge: Judge, images: torch.Tensor, prompts: list[str]) -> tuple[list[Scene], list[bool | None]]:
    """What the judge sees in each image, and whether it agrees with every attribute the prompt states
    (None when the prompt is outside the shapes grammar)."""
    scenes = [s for i in range(0, len(prompts), 512) for s in judge.read(images[i:i + 512])]
    ok = []
    for p, s in zip(prompts, scenes):
        parsed = parse(p)
        ok.append(None if parsed is None else matches(parsed, s))
    return scenes, ok


def scene_from_dict(d: dict) -> Scene:
    return Scene(tuple(Obj(**o) for o in d["objects"]), d["background"], d.get("position"), d.get("relation"))


def load_judge(url: str, device: torch.device | str = "cpu", storage_options: dict | None = None) -> Judge:
    """A judge checkpoint directory, in eval mode on `device`."""
    return load_module(url, "judge", lambda c: Judge(JudgeConfig(**c["config"])), storage_options)[1].to(device)
