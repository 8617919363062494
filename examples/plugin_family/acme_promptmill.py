"""A generator family in its own package: `pip install .` here, then `family: acme` in a spec.

The whole contract: a class with `family`, a pydantic `Sampling`, `height`/`width`, a `load` classmethod (or our
config.json + safetensors layout via from_config/from_checkpoint) and a batch-invariant `generate`.
"""

from __future__ import annotations

import hashlib
import json

import fsspec
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field


class AcmeSampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    radius: float = Field(default=0.3, gt=0, le=1, description="disc radius, a fraction of the image")


class AcmeDiscs:
    """Draws one disc per image: its colour from the prompt, its place from the seed."""

    family = "acme"
    Sampling = AcmeSampling

    def __init__(self, size: int) -> None:
        self.height = self.width = size

    @classmethod
    def load(cls, url: str, device: torch.device, storage_options: dict | None = None) -> AcmeDiscs:
        with fsspec.open(f"{url.rstrip('/')}/config.json", **(storage_options or {})) as f:
            return cls(int(json.load(f)["size"]))

    def generate(self, prompts: list[str], seeds: list[int], **sampling) -> np.ndarray:
        s = AcmeSampling(**sampling)
        yy, xx = np.mgrid[0:self.height, 0:self.width] / self.height
        out = np.zeros((len(prompts), self.height, self.width, 3), np.uint8)
        for i, (p, seed) in enumerate(zip(prompts, seeds)):  # image i from (prompt i, seed i) alone
            colour = np.frombuffer(hashlib.blake2b(p.encode(), digest_size=3).digest(), np.uint8)
            cy, cx = np.random.default_rng(seed).uniform(0.2, 0.8, 2)
            out[i][(yy - cy) ** 2 + (xx - cx) ** 2 < s.radius**2] = colour
        return out
