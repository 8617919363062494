"""The generate stage: a Ray Data callable class, one model load per actor, one `generate` per batch."""

from __future__ import annotations

import json
import logging

import numpy as np
import torch

from models import load_generator
from pipelines.encode import encode_image
from pipelines.spec import ModelSpec

log = logging.getLogger(__name__)


class GenerateStage:
    def __init__(self, model: ModelSpec, image_format: str) -> None:
        use_cuda = model.resources.num_gpus > 0 and torch.cuda.is_available()
        self.device = "cuda" if use_cuda else "cpu"
        self.model, self.image_format = model, image_format
        self.gen = load_generator(model.checkpoint, self.device, model.storage_options)
        self.sampling = self.gen.Sampling(**model.sampling).model_dump()
        log.info("loaded %s (%s) on %s", model.name, model.family, self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        images = self.gen.generate(prompts, [int(s) for s in batch["seed"]], **self.sampling)
        n = len(prompts)
        batch["image"] = np.array([encode_image(im, self.image_format) for im in images], object)
        batch["model"] = np.full(n, self.model.name, object)
        batch["family"] = np.full(n, self.model.family, object)
        batch["checkpoint"] = np.full(n, self.model.checkpoint, object)
        batch["sampling"] = np.full(n, json.dumps(self.sampling, sort_keys=True), object)
        batch["width"] = np.full(n, self.gen.width, np.int32)
        batch["height"] = np.full(n, self.gen.height, np.int32)
        batch["device"] = np.full(n, self.device, object)
        return batch
