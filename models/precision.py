"""The dtype a generator computes in: fp32, or torch autocast to bf16 / fp16 around its `generate`.

Autocast rather than cast weights: a family needs no code for it (plugins included), numerically touchy ops
(softmax, norms) stay fp32 by autocast's own lists, and the checkpoint loads as it is stored.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: str | torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=DTYPES[precision])


class AtPrecision:
    """A generator whose `generate` runs under autocast; every other attribute is the wrapped generator's."""

    def __init__(self, gen: Any, device: str | torch.device, precision: str) -> None:
        self.gen, self.device_type, self.precision = gen, torch.device(device).type, precision

    def generate(self, prompts: list[str], seeds: list[int], **sampling: Any) -> np.ndarray:
        with autocast(self.device_type, self.precision):
            return self.gen.generate(prompts, seeds, **sampling)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.gen, name)


def at_precision(gen: Any, device: str | torch.device, precision: str | None) -> Any:
    """`gen` computing in `precision` (None: fp32); a family that sets `handles_precision` loaded its weights in
    that dtype itself (diffusers) and is returned as it is."""
    if precision in (None, "fp32") or getattr(gen, "handles_precision", False):
        return gen
    return AtPrecision(gen, device, precision)
