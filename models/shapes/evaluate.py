"""Measured quality of the shipped models on the shapes test split (`promptmill eval-models`).

prompt-match = the judge's reading of an image agrees with every attribute the prompt states; reported
for in-distribution vs held-out colour-shape pairs and one- vs two-object prompts. The judge itself is
scored on real renders, and the VQ round trip gives the Transformer's ceiling.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from models.clip import CLIPScorer
from models.generator import load_generator
from models.images import decode_image, to_nchw, to_nhwc
from models.judge import HEADS, IGNORE, Judge, judge_prompts, labels, scene_from_dict
from models.rerank import generate_best_of
from models.shapes import Scene, binding_swaps, mismatches, parse, stated
from models.vq import load_vq


@dataclass
class TestSplit:
    images: torch.Tensor  # uint8 (N, 3, H, W)
    captions: list[str]
    scenes: list[Scene]
    held_out: list[bool]

    COLUMNS: ClassVar[list[str]] = ["png", "caption", "attributes", "held_out"]  # of `promptmill dataset shapes`

    @classmethod
    def from_rows(cls, rows: dict[str, list]) -> TestSplit:
        """From the dataset's columns (`COLUMNS`, e.g. `pipelines.tables.read_rows`): models/ does no storage I/O."""
        images = to_nchw(np.stack([decode_image(b) for b in rows["png"]]))
        return cls(images, rows["caption"], [scene_from_dict(json.loads(a)) for a in rows["attributes"]], rows["held_out"])


def judge_accuracy(judge: Judge, split: TestSplit) -> dict[str, float]:
    with torch.no_grad():
        preds = {k: [] for k in HEADS}
        for i in range(0, len(split.captions), 500):
            for k, v in judge(split.images[i:i + 500]).items():
                preds[k].append(v.argmax(-1))
    y = labels(split.scenes)
    acc = {}
    for k in HEADS:
        p = torch.cat(preds[k])
        mask = y[k] != IGNORE
        acc[k] = (p[mask] == y[k][mask]).float().mean().item()
    return acc


def _breakdown(ok: list[bool], split: TestSplit) -> dict[str, float | int]:
    ok_a = np.array(ok)
    held = np.array(split.held_out[: len(ok)])
    two = np.array([len(s.objects) == 2 for s in split.scenes[: len(ok)]])

    def frac(mask: np.ndarray) -> float:
        return round(float(ok_a[mask].mean()), 4) if mask.any() else float("nan")

    return {"all": frac(np.ones_like(held)), "in_distribution": frac(~held), "held_out": frac(held),
            "one_object": frac(~two), "two_objects": frac(two), "n": len(ok)}


def prompt_match(judge: Judge, images: torch.Tensor, captions: list[str]) -> list[bool]:
    return [bool(ok) for ok in judge_prompts(judge, images, captions)[1]]


def attribute_errors(captions: list[str], scenes: list[Scene]) -> dict[str, dict[str, float]]:
    """Per object count, how often the judge reads each stated attribute otherwise (over the prompts that
    state it): prompt-match says that an image fails, this says where ("shape1": the second object's shape)."""
    wrong: dict[str, dict[str, int]] = {}
    asked: dict[str, dict[str, int]] = {}
    for cap, scene in zip(captions, scenes):
        p = parse(cap)
        group = "one_object" if len(p.objects) == 1 else "two_objects"
        for k in stated(p):
            asked.setdefault(group, {}).setdefault(k, 0)
            asked[group][k] += 1
        for k in mismatches(p, scene):
            wrong.setdefault(group, {}).setdefault(k, 0)
            wrong[group][k] += 1
    return {g: {k: round(wrong.get(g, {}).get(k, 0) / n, 4) for k, n in sorted(ks.items())} for g, ks in asked.items()}


def seed_diversity(url: str, captions: list[str], seeds: int = 8) -> float:
    """Mean per-pixel standard deviation (of 255) across `seeds` seeds per caption: how much the noise changes
    the image. A GAN near 0 has collapsed to one image per caption, and rerank has nothing to pick from."""
    g = load_generator(url, "cpu")
    imgs = np.stack([g.generate(captions, [s * 100_003 + i for i in range(len(captions))]) for s in range(seeds)])
    return round(float(imgs.astype(np.float32).std(0).mean()), 2)


def eval_generator(url: str, judge: Judge, split: TestSplit, n: int, batch: int = 64,
                   **sampling) -> tuple[dict, dict, np.ndarray]:
    """Prompt-match breakdown, attribute error rates and the images of the first n test prompts."""
    g = load_generator(url, "cpu")
    caps = split.captions[:n]
    imgs = np.concatenate([g.generate(caps[i:i + batch], list(range(i, min(n, i + batch))), **sampling)
                           for i in range(0, n, batch)])
    scenes, ok = judge_prompts(judge, to_nchw(imgs), caps)
    return _breakdown([bool(o) for o in ok], split), attribute_errors(caps, scenes), imgs


def eval_vq(url: str, judge: Judge, split: TestSplit, n: int) -> dict:
    vq = load_vq(url)
    with torch.no_grad():
        x = split.images[:n].float() / 127.5 - 1
        tokens = vq.encode(x)
        recon = vq.decode(tokens)
        mse = torch.mean((recon - x) ** 2).item()
    imgs = ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    ok = prompt_match(judge, imgs, split.captions[:n])
    usage = tokens.unique().numel() / vq.cfg.codebook_size
    return {"recon_mse": round(mse, 5), "codebook_usage": round(usage, 4), "prompt_match": _breakdown(ok, split)}


def grid_png(images: np.ndarray, captions: list[str], path: str, cols: int = 8, scale: int = 3) -> None:
    """Nearest-neighbour upscaled sample grid (32 px images are too small to see)."""
    from PIL import Image

    rows = len(images) // cols
    g = np.concatenate([np.concatenate(list(images[r * cols:(r + 1) * cols]), 1) for r in range(rows)], 0)
    Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST).save(path)


def r_precision(scorer: CLIPScorer, images: np.ndarray, captions: list[str], distractors: int = 99,
                seed: int = 0) -> float:
    """CLIP R-precision: how often the true caption outranks `distractors` random captions of other images."""
    img, txt = scorer.embed_images(images), scorer.embed_texts(captions)
    n = len(captions)
    k = min(distractors, n - 1)
    rng = np.random.default_rng(seed)
    hits = 0
    for i in range(n):
        others = rng.choice(n - 1, k, replace=False)
        cand = torch.tensor([i, *(others + (others >= i))])  # skip i itself
        hits += int((txt[cand] @ img[i]).argmax().item() == 0)
    return hits / n


def r_precision_split(scorer: CLIPScorer, split: TestSplit, n: int) -> dict[str, float]:
    """R-precision over the first n test renders, and separately over held-out / in-distribution ones."""
    imgs = to_nhwc(split.images[:n])
    caps = split.captions[:n]
    held = np.array(split.held_out[:n])
    out = {"all": r_precision(scorer, imgs, caps)}
    for name, mask in (("in_distribution", ~held), ("held_out", held)):
        idx = np.flatnonzero(mask)
        out[name] = r_precision(scorer, imgs[idx], [caps[i] for i in idx])
    return {k: round(v, 4) for k, v in out.items()}


def clip_binding(scorer: CLIPScorer, split: TestSplit, n: int) -> dict[str, float]:
    """Per attribute: how often CLIP scores a two-object render's own caption above the same caption with that
    attribute swapped between the objects (first n test renders). 0.5 is chance: CLIP would not know which
    object has which shape, and neither would a generator conditioned or guided by it."""
    imgs = to_nhwc(split.images[:n])
    img = scorer.embed_images(imgs)
    own = scorer.embed_texts(split.captions[:n])
    pairs: dict[str, list[tuple[int, str]]] = {}
    for i, c in enumerate(split.captions[:n]):
        for kind, swapped in binding_swaps(c).items():
            pairs.setdefault(kind, []).append((i, swapped))
    out = {}
    for kind, ps in sorted(pairs.items()):
        idx = torch.tensor([i for i, _ in ps])
        other = scorer.embed_texts([t for _, t in ps])
        out[kind] = round(((img[idx] * own[idx]).sum(1) > (img[idx] * other).sum(1)).float().mean().item(), 4)
    return out


def eval_rerank(url: str, scorer: CLIPScorer, judge: Judge, split: TestSplit, n: int, ks: list[int],
                batch: int = 32, **sampling) -> dict[int, dict]:
    """Prompt-match of the kept image when drawing K candidates and keeping the best clip_score."""
    g = load_generator(url, "cpu")
    caps = split.captions[:n]
    out = {}
    for k in ks:
        imgs = np.concatenate([generate_best_of(g, scorer, caps[i:i + batch], list(range(i, min(n, i + batch))), k,
                                                **sampling).images for i in range(0, n, batch)])
        ok = prompt_match(judge, to_nchw(imgs), caps)
        out[k] = _breakdown(ok, split)
    return out
