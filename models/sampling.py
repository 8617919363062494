"""Sampling helpers shared by the generator families: per-image RNGs, top-k / top-p, guidance.

One `torch.Generator` per image (as diffusers does) so an image depends on its seed only, never on
which other prompts shared its batch.
"""

from __future__ import annotations

import torch


def per_image_generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def per_image_normal(gens: list[torch.Generator], shape: tuple[int, ...], truncation: float | None = None) -> torch.Tensor:
    """Standard normal draws per image; with `truncation`, values beyond it are redrawn (truncation trick)."""
    out = []
    for g in gens:
        z = torch.randn(shape, generator=g)
        if truncation is not None:
            bad = z.abs() > truncation
            while bad.any():  # rejection resampling keeps the truncated normal exact
                z[bad] = torch.randn(int(bad.sum()), generator=g)
                bad = z.abs() > truncation
        out.append(z)
    return torch.stack(out)


def per_image_uniform(gens: list[torch.Generator], steps: int) -> torch.Tensor:
    """(N, steps) uniforms drawn up front: step t of image i always uses the same number."""
    return torch.stack([torch.rand(steps, generator=g) for g in gens])


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance on logits; scale 1 is the conditional model alone."""
    return uncond + scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Mask logits outside the top-k and outside the smallest set with cumulative probability >= top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def sample_with_uniform(logits: torch.Tensor, u: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Inverse-CDF sampling: row i takes the token where its CDF first exceeds u[i]. temperature 0 = argmax."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    cdf = probs.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).squeeze(-1)
    return idx.clamp_(max=logits.size(-1) - 1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous()
