"""The scoring stage: its own Ray Data actor pool (CLIP + judge loaded once per actor) between generate and write.

Adds `clip_score` (torchmetrics' CLIPScore: max(100 * cosine, 0)), `judged` (the judge's reading of the
image as JSON, with its near-miss flag), `geometry` (the non-learned check's reading: objects, holes, solidity,
template fits) and `prompt_match` (both readings agree with every attribute the prompt states and neither sees a
malformed drawing; null, like `geometry`, for prompts outside the shapes grammar). A disabled scorer or one
without a checkpoint leaves its columns null.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from models.clip import load_clip
from models.images import to_nchw
from models.judge import judge_prompts, load_judge
from pipelines.spec import ScoringSpec, redact

log = logging.getLogger(__name__)


def device_for(num_gpus: float) -> str:
    """CUDA when the actor was given a GPU and torch sees one; CPU otherwise (the fallback)."""
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


class ScoreStage:
    def __init__(self, scoring: ScoringSpec) -> None:
        self.device = device_for(scoring.resources.num_gpus)
        so = scoring.storage_options
        self.clip = load_clip(scoring.clip, self.device, so) if scoring.clip else None
        self.judge = load_judge(scoring.judge, self.device, so) if scoring.judge else None
        log.info("scoring on %s (clip=%s, judge=%s)", self.device, *redact([scoring.clip, scoring.judge]))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        n = len(prompts)
        pixels = np.asarray(batch["pixels"])
        batch["clip_score"] = (self.clip.score(pixels, prompts).astype(np.float64) if self.clip
                               else np.full(n, None, object))
        if self.judge is not None:
            with torch.no_grad():
                x = to_nchw(pixels).to(self.device)
                verdicts = judge_prompts(self.judge, x, prompts)
            batch["judged"] = np.array([json.dumps(v.judged(), sort_keys=True) for v in verdicts], object)
            batch["geometry"] = np.array([v.geometry and json.dumps(v.geometry.to_dict(), sort_keys=True)
                                          for v in verdicts], object)
            batch["prompt_match"] = np.array([v.match for v in verdicts], object)
            batch["judge_features"] = np.array([v.features.float().cpu().numpy() for v in verdicts] + [None],
                                               object)[:-1]  # an array of arrays, not a 2-D array
        else:
            for k in ("judged", "geometry", "prompt_match", "judge_features"):
                batch[k] = np.full(n, None, object)
        return batch
