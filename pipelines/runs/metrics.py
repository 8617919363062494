"""Job-level metrics: FID, KID, Inception Score and k-NN precision / recall against a reference set.

Inception weights cannot be fetched here, so the feature space is the judge's penultimate layer (FID, KID,
precision / recall) and its logits (IS), through torchmetrics' custom-module hooks; without a judge, a CLIP's image
embeddings (`CLIPFeatures`: Fréchet distance, KID, precision / recall; no IS). IS uses the judge's
joint (shape, colour) reading of the first object: 32 classes, so IS lies in [1, 32]. Every model is
reported beside the real-vs-real floor of the same size (reference vs disjoint reference images), which
is what a number should be read against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
from promptmill.models.images import by_shape, to_nchw
from promptmill.models.judge import Judge
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance

PR_K = 3


class JudgeFeatures(nn.Module):
    """uint8 (N, 3, H, W) -> the judge's penultimate activations."""

    def __init__(self, judge: Judge) -> None:
        super().__init__()
        self.judge = judge.eval()
        self.num_features = judge.cfg.features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.judge.features(x)


class JudgeLogits(nn.Module):
    """Log-probabilities of the first object's (shape, colour): a 32-way classifier for IS."""

    def __init__(self, judge: Judge) -> None:
        super().__init__()
        self.judge = judge.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.judge(x)
        joint = out["shape0"].log_softmax(-1)[:, :, None] + out["color0"].log_softmax(-1)[:, None, :]
        # a floor: a judge certain enough to underflow a class to 0 in every image made IS 0 * log 0 = nan
        return joint.flatten(1).clamp(min=-50)


def knn_precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = PR_K) -> tuple[float, float]:
    """Kynkäänniemi et al. 2019: precision = share of fakes inside the real manifold (union of k-NN balls
    around real features), recall = share of reals inside the fake manifold."""

    def radii(x: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # +1: the point itself is its own nearest neighbour

    def inside(points: torch.Tensor, centres: torch.Tensor, r: torch.Tensor) -> float:
        return (torch.cdist(points, centres) <= r[None, :]).any(1).float().mean().item()

    real, fake = real.double(), fake.double()
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


class CLIPFeatures(nn.Module):
    """uint8 (N, 3, H, W) -> a CLIP's image embeddings: FD and KID in CLIP space, for images of any domain
    (Kynkäänniemi et al. 2023 argue for it over Inception's)."""

    def __init__(self, scorer) -> None:
        super().__init__()
        self.scorer = scorer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scorer.embed_images(x.permute(0, 2, 3, 1).cpu().numpy()).float().cpu()


class Evaluator:
    """Reference statistics computed once (torchmetrics' reset_real_features=False), then any number of
    image sets compared against them. The feature space is the judge's (our shapes models; with Inception
    Score from its logits) or, given `features` (CLIPFeatures), that module's (no Inception Score)."""

    def __init__(self, judge: Judge | None, reference: Sequence[np.ndarray], batch: int = 500,
                 features: nn.Module | None = None) -> None:
        if len(reference) < 2:
            raise ValueError(f"need at least 2 reference images, got {len(reference)}")
        if (judge is None) == (features is None):
            raise ValueError("one feature space: a judge or `features`")
        self.judge, self.batch, self.n_reference = judge and judge.eval(), batch, len(reference)
        self.feats = JudgeFeatures(judge) if judge is not None else features.eval()
        self.fid = FrechetInceptionDistance(feature=self.feats, reset_real_features=False)
        self.kid_subset = min(1000, len(reference))
        self.kid = KernelInceptionDistance(feature=self.feats, subset_size=self.kid_subset, subsets=20,
                                           reset_real_features=False)
        self.real_features = self._update(reference, real=True)

    @torch.no_grad()
    def _update(self, images: Sequence[np.ndarray], real: bool, inception: InceptionScore | None = None
                ) -> torch.Tensor:
        """Features of uint8 (H, W, 3) images of any sizes (the judge resizes), one size per batch."""
        out = []
        for _, stack in by_shape(images):
            for i in range(0, len(stack), self.batch):
                x = to_nchw(stack[i:i + self.batch])
                self._update_batch(x, real, inception)
                out.append(self.feats(x))
        return torch.cat(out)

    def _update_batch(self, x: torch.Tensor, real: bool, inception: InceptionScore | None) -> None:
        self.fid.update(x, real=real)
        self.kid.update(x, real=real)
        if inception is not None:
            inception.update(x)

    @torch.no_grad()
    def __call__(self, images: Sequence[np.ndarray]) -> dict[str, float]:
        """uint8 (H, W, 3) images, any sizes -> fid, kid (+ std), inception score (+ std), precision, recall."""
        if len(images) < 2:
            raise ValueError(f"need at least 2 images, got {len(images)}")
        self.fid.reset()
        self.kid.reset()
        self.kid.subset_size = min(self.kid_subset, len(images))
        inception = (InceptionScore(feature=JudgeLogits(self.judge), splits=min(10, len(images)))
                     if self.judge is not None else None)
        fake = self._update(images, real=False, inception=inception)
        kid_mean, kid_std = self.kid.compute()
        is_mean, is_std = (t.item() for t in inception.compute()) if inception is not None else (None, None)
        precision, recall = knn_precision_recall(self.real_features, fake)
        out = {"fid": self.fid.compute().item(), "kid": kid_mean.item(), "kid_std": kid_std.item(),
               "inception_score": is_mean, "inception_score_std": is_std,
               "precision": precision, "recall": recall, "n_reference": self.n_reference, "n_images": len(images)}
        return {k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}


def compare(judge: Judge | None, reference: Sequence[np.ndarray], runs: dict[str, Sequence[np.ndarray]],
            features: nn.Module | None = None) -> dict[str, dict[str, float]]:
    """Every model against the first half of the reference, and the floor: that half against the
    (disjoint) rest, cut to the largest model's size."""
    half = len(reference) // 2
    ev = Evaluator(judge, reference[:half], features=features)
    n = max((len(v) for v in runs.values()), default=0)
    out = {name: ev(imgs) for name, imgs in runs.items()}
    out["real_vs_real"] = ev(reference[half:][: max(n, 2)])
    return out


def table(metrics: dict[str, dict[str, float]]) -> str:
    cols = ["fid", "kid", "inception_score", "precision", "recall", "n_images"]
    rows = [f"{'model':<16}" + "".join(f"{c:>17}" for c in cols)]
    for name, m in metrics.items():
        rows.append(f"{name:<16}" + "".join(f"{m.get(c) if m.get(c) is not None else float('nan'):>17.4f}"
                                           if c != "n_images"
                                           else f"{m.get(c, 0):>17d}" for c in cols))
    return "\n".join(rows)
