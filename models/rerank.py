"""Best-of-K (DALL-E's rerank): draw K candidates per requested image, keep the one a chooser scores highest.

Candidate 0 uses the image's own seed, so K = 1 is exactly the plain sample and a larger K can only keep
it or find a better-scoring one. Other candidates' seeds derive from (seed, k), so the kept image
depends on its seed, K and the chooser only, never on its batch. A chooser orders candidates by one score
(clip_score, the judge's prompt_match, an aesthetic score); a second score breaks its ties, then the earliest draw.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from promptmill.models.generator import Generator
from promptmill.models.images import to_nchw
from promptmill.models.judge import Judge, judge_prompts
from promptmill.models.scorer import Scorer

PER_ROW_SAMPLING = ("negative_prompt",)  # sampling values given one per image (input.negative_prompt_column)
# uint8 images (N, H, W, 3) and their prompts -> (N,) floats, higher is better
Score = Callable[[np.ndarray, list[str]], np.ndarray]


def candidate_seed(seed: int, k: int) -> int:
    if k == 0:
        return int(seed)
    h = hashlib.blake2b(f"{int(seed)}\x1fcandidate\x1f{k}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") >> 1


@dataclass(frozen=True)
class Chooser:
    """What best-of-K keeps: the candidate with the highest `score`, ties to the highest `tie_break` (computed for
    the tied candidates only), then to the earliest draw. `recorded` maps a score to its metadata column's value."""

    name: str  # the score column it orders by, recorded per image (`rerank_by`)
    score: Score
    tie_break: Score | None = None
    recorded: Callable[[float], float | None] = float


def prompt_match_score(judge: Judge, device: str = "cpu") -> Score:
    """1 for a match, 0 for none, -1 outside the shapes grammar (no reading: every candidate ties)."""
    def score(images: np.ndarray, prompts: list[str]) -> np.ndarray:
        with torch.no_grad():
            verdicts = judge_prompts(judge, to_nchw(images).to(device), prompts)
        return np.array([-1.0 if v.match is None else float(v.match) for v in verdicts])
    return score


def aesthetic_score(clip: Scorer, predictor: Callable[[np.ndarray], np.ndarray]) -> Score:
    return lambda images, prompts: predictor(clip.embed_images(images).float().cpu().numpy())


@dataclass(frozen=True)
class Scorers:
    """The scorers a chooser may use, loaded once per process by its caller (the job shares them with scoring)."""

    clip: Scorer
    judge: Judge | None = None  # for families that draw the shapes domain it reads
    aesthetic: Callable[[np.ndarray], np.ndarray] | None = None  # CLIP image embeddings -> aesthetic_score
    device: str = "cpu"


# rerank_by -> its chooser; clip_score's raw similarity orders (clip_score clamps at 0, which would tie every
# candidate the CLIP finds unrelated). The spec's RERANK_BY names the same keys without importing torch, and refuses
# a chooser whose scorer the job does not have.
CHOOSERS: dict[str, Callable[[Scorers], Chooser]] = {
    "clip_score": lambda s: Chooser("clip_score", s.clip.similarity,
                                    s.judge and prompt_match_score(s.judge, s.device), lambda v: max(float(v), 0.0)),
    "prompt_match": lambda s: Chooser("prompt_match", prompt_match_score(s.judge, s.device), s.clip.similarity,
                                      lambda v: None if v < 0 else float(v)),
    "aesthetic_score": lambda s: Chooser("aesthetic_score", aesthetic_score(s.clip, s.aesthetic), s.clip.similarity),
}


def choose(scores: np.ndarray, tie_break: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """(N, K) scores -> (N,) index of the kept candidate. `tie_break(flat)` scores the candidates at flat indices
    (row * K + k) that tie for a row's best; without it, or where it ties too, the earliest draw is kept."""
    n, k = scores.shape
    tied = scores == scores.max(1, keepdims=True)
    best = tied.argmax(1)  # the earliest of the tied
    rows = np.flatnonzero(tied.sum(1) > 1)
    if tie_break is None or not len(rows):
        return best
    flat = np.flatnonzero(tied[rows].ravel())
    flat = rows[flat // k] * k + flat % k  # into the (N * K) numbering
    second = np.full(n * k, -np.inf)
    second[flat] = tie_break(flat)
    second = second.reshape(n, k)
    best[rows] = (second[rows] == second[rows].max(1, keepdims=True)).argmax(1)
    return best


@dataclass
class Reranked:
    images: np.ndarray  # uint8 (N, H, W, 3): the kept candidates
    index: np.ndarray  # (N,) which of the K draws was kept
    score: np.ndarray  # (N,) object: its score by the chooser, as the chooser's column records it
    info: dict[str, list] | None = None  # the generator's `last_info` for the kept candidates


def generate_best_of(gen: Generator, chooser: Chooser, prompts: list[str], seeds: list[int], candidates: int,
                     **sampling) -> Reranked:
    """One generate call for all N*K candidates (image-major), then one scoring pass by the chooser."""
    if candidates < 1:
        raise ValueError(f"candidates must be >= 1, got {candidates}")
    n = len(prompts)
    all_prompts = [p for p in prompts for _ in range(candidates)]
    all_seeds = [candidate_seed(s, k) for s in seeds for k in range(candidates)]
    per_row = {k: [x for x in sampling[k] for _ in range(candidates)] for k in PER_ROW_SAMPLING
               if isinstance(sampling.get(k), list)}
    imgs = np.asarray(gen.generate(all_prompts, all_seeds, **{**sampling, **per_row}))
    drawn = getattr(gen, "last_info", None) or {}
    scores = np.asarray(chooser.score(imgs, all_prompts), np.float64).reshape(n, candidates)
    tie = chooser.tie_break and (lambda flat: np.asarray(chooser.tie_break(imgs[flat], [all_prompts[i] for i in flat]),
                                                         np.float64))
    best = choose(scores, tie)
    kept = imgs.reshape(n, candidates, *imgs.shape[1:])[np.arange(n), best]
    score = np.array([chooser.recorded(s) for s in scores[np.arange(n), best]], object)
    info = {k: [v[i * candidates + int(b)] for i, b in enumerate(best)] for k, v in drawn.items()}
    return Reranked(kept, best, score, info or None)
