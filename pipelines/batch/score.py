"""The scoring stage: its own Ray Data actor pool (CLIP + judge loaded once per actor) between generate and write.

Adds `clip_score` (torchmetrics' CLIPScore: max(100 * cosine, 0)), `judged` (the judge's reading of the
image as JSON, with its near-miss flag), `geometry` (the non-learned check's reading: objects, holes, solidity,
template fits) and `prompt_match` (both readings agree with every attribute the prompt states and neither sees a
malformed drawing; null, like `geometry`, for prompts outside the shapes grammar). Without a judge, the CLIP's image
embeddings go into `clip_features` (diversity and near-duplicates then come from them); `scoring.aesthetic` adds
`aesthetic_score` from the same embeddings. A disabled scorer or one without a checkpoint leaves its columns null.
Rerank's choosers (`rerank_chooser`) use the same scorers, loaded once per process.
"""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import torch
from promptmill.models.aesthetic import load_aesthetic
from promptmill.models.clip_loader import load_clip
from promptmill.models.images import by_shape, to_nchw
from promptmill.models.judge import Judge, judge_prompts, load_judge
from promptmill.models.rerank import CHOOSERS, Chooser, Scorers
from promptmill.models.scorer import Scorer
from promptmill.pipelines.batch.isolate import run_isolated
from promptmill.pipelines.batch.threads import ActorThreads
from promptmill.pipelines.redaction import redact
from promptmill.pipelines.spec import JUDGED_FAMILIES, ModelSpec, ScoringSpec

log = logging.getLogger(__name__)
COLUMNS = ("clip_score", "judged", "geometry", "prompt_match", "judge_features", "clip_features", "aesthetic_score")


@functools.cache
def _clip(url: str, device: str, options: str) -> Scorer:
    return load_clip(url, device, json.loads(options))


def shared_clip(scoring: ScoringSpec, device: str) -> Scorer:
    """`scoring.clip` loaded once per process and device: rerank and scoring in one actor hold one copy."""
    return _clip(scoring.clip, device, json.dumps(scoring.storage_options, sort_keys=True))


@functools.cache
def _judge(url: str, device: str, options: str) -> Judge:
    return load_judge(url, device, json.loads(options))


def shared_judge(scoring: ScoringSpec, device: str) -> Judge:
    """`scoring.judge` loaded once per process and device, like `shared_clip`."""
    return _judge(scoring.judge, device, json.dumps(scoring.storage_options, sort_keys=True))


@functools.cache
def _aesthetic(url: str, options: str, width: int):
    return load_aesthetic(url, json.loads(options), width=width)


def shared_aesthetic(scoring: ScoringSpec, clip: Scorer):
    """`scoring.aesthetic` once per process, checked against the width of the CLIP's image embeddings it reads."""
    width = clip.embed_images(np.zeros((1, 32, 32, 3), np.uint8)).shape[-1]
    return _aesthetic(scoring.aesthetic, json.dumps(scoring.storage_options, sort_keys=True), width)


def rerank_chooser(model: ModelSpec, scoring: ScoringSpec, device: str) -> Chooser | None:
    """Best-of-K's chooser for `model` (`sampling.rerank_by`) on this process's shared scorers; None at K = 1. The
    judge breaks clip_score's ties only for families that draw its domain."""
    if model.candidates == 1:
        return None
    clip = shared_clip(scoring, device)
    judge = shared_judge(scoring, device) if scoring.judge and model.family in JUDGED_FAMILIES else None
    aesthetic = shared_aesthetic(scoring, clip) if model.rerank_by == "aesthetic_score" else None
    return CHOOSERS[model.rerank_by](Scorers(clip, judge, aesthetic, device))


def device_for(num_gpus: float) -> str:
    """CUDA when the actor was given a GPU and torch sees one; CPU otherwise (the fallback)."""
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


class ScoreStage:
    """Its own pool's actor (`scoring.pool`), or held by a generator actor that scores what it draws (`device`:
    the generator's)."""

    def __init__(self, scoring: ScoringSpec, device: str | None = None, threads: int | None = None,
                 num_gpus: float | None = None) -> None:
        self.threads = ActorThreads(threads)
        # in a generator actor: its GPUs (`num_gpus`), decided here, where the actor sees its devices
        self.device = device or device_for(scoring.resources.num_gpus if num_gpus is None else num_gpus)
        self.clip = shared_clip(scoring, self.device) if scoring.clip else None
        self.judge = shared_judge(scoring, self.device) if scoring.judge else None
        self.aesthetic = shared_aesthetic(scoring, self.clip) if scoring.aesthetic else None
        log.info("scoring on %s (clip=%s, judge=%s)", self.device, *redact([scoring.clip, scoring.judge]))

    def score(self, pixels: np.ndarray, prompts: list[str]) -> dict[str, list]:
        """The score columns for these images, one value per image."""
        n = len(prompts)
        out: dict[str, list] = {k: [None] * n for k in COLUMNS}
        if self.clip is not None and (self.judge is None or self.aesthetic is not None):
            scores, embeddings = self.clip.score_and_embed(pixels, prompts)
            out["clip_score"] = scores.astype(np.float64).tolist()
            if self.judge is None:  # diversity and near-duplicates then come from the CLIP (diversity.py)
                out["clip_features"] = list(embeddings)
            if self.aesthetic is not None:
                out["aesthetic_score"] = self.aesthetic(embeddings).tolist()
        elif self.clip is not None:
            out["clip_score"] = self.clip.score(pixels, prompts).astype(np.float64).tolist()
        if self.judge is not None:
            with torch.no_grad():
                verdicts = judge_prompts(self.judge, to_nchw(pixels).to(self.device), prompts)
            out["judged"] = [json.dumps(v.judged(), sort_keys=True) for v in verdicts]
            out["geometry"] = [v.geometry and json.dumps(v.geometry.to_dict(), sort_keys=True) for v in verdicts]
            out["prompt_match"] = [v.match for v in verdicts]
            out["judge_features"] = [v.features.float().cpu().numpy() for v in verdicts]
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.threads.on_call()
        prompts = [str(p) for p in batch["prompt"]]
        n = len(prompts)
        pixels = batch["pixels"]
        gen_error = batch.get("generation_error", np.full(n, None, object))
        todo = [i for i in range(n) if not isinstance(gen_error[i], str)]  # a failed row has nothing to score
        cols = {k: np.full(n, None, object) for k in (*COLUMNS, "scoring_error")}
        for rows, stack in by_shape([pixels[i] for i in todo]):  # one size at a time: models of several sizes
            rows = [todo[r] for r in rows]  # this size's rows of the batch, in the stack's order
            done, failed = run_isolated(lambda pos, stack=stack, rows=rows: self.score(
                stack[pos], [prompts[rows[j]] for j in pos]), list(range(len(rows))))
            for pos, out in done:
                for k, values in out.items():
                    for j, v in zip(pos, values):
                        cols[k][rows[j]] = v
            for j, text in failed.items():  # the image is kept, unscored, with the reason
                cols["scoring_error"][rows[j]] = text
        batch.update(cols)
        return batch
