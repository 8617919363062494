"""DALL-E's rerank: draw K candidates per requested image, keep the one the CLIP scores highest.

Candidate 0 uses the image's own seed, so K = 1 is exactly the plain sample and a larger K can only keep
it or find a better-scoring one. Other candidates' seeds derive from (seed, k), so the kept image
depends on its seed and K only, never on its batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from promptmill.models.generator import Generator
from promptmill.models.scorer import Scorer

PER_ROW_SAMPLING = ("negative_prompt",)  # sampling values given one per image (input.negative_prompt_column)


def candidate_seed(seed: int, k: int) -> int:
    if k == 0:
        return int(seed)
    h = hashlib.blake2b(f"{int(seed)}\x1fcandidate\x1f{k}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass
class Reranked:
    images: np.ndarray  # uint8 (N, H, W, 3): the kept candidates
    index: np.ndarray  # (N,) which of the K draws was kept
    score: np.ndarray  # (N,) its clip_score
    all_scores: np.ndarray  # (N, K)
    info: dict[str, list] | None = None  # the generator's `last_info` for the kept candidates


def generate_best_of(gen: Generator, scorer: Scorer, prompts: list[str], seeds: list[int], candidates: int,
                     **sampling) -> Reranked:
    """One generate call for all N*K candidates (image-major), then one scoring pass."""
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    n = len(prompts)
    all_prompts = [p for p in prompts for _ in range(candidates)]
    all_seeds = [candidate_seed(s, k) for s in seeds for k in range(candidates)]
    per_row = {k: [x for x in sampling[k] for _ in range(candidates)] for k in PER_ROW_SAMPLING
               if isinstance(sampling.get(k), list)}
    imgs = gen.generate(all_prompts, all_seeds, **{**sampling, **per_row})
    drawn = getattr(gen, "last_info", None) or {}
    sims = scorer.similarity(imgs, all_prompts).reshape(n, candidates)
    best = sims.argmax(1)  # by the raw similarity (clip_score clamps at 0); ties keep the earliest draw
    kept = imgs.reshape(n, candidates, *imgs.shape[1:])[np.arange(n), best]
    scores = np.maximum(sims, 0)
    info = {k: [v[i * candidates + int(b)] for i, b in enumerate(best)] for k, v in drawn.items()}
    return Reranked(kept, best, scores[np.arange(n), best], scores, info or None)
