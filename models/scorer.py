"""The scorer contract: `clip_score` from `embed_images` / `embed_texts` (unit vectors), shared by our CLIP and a
Hugging Face CLIP so rerank and scoring need neither."""

from __future__ import annotations

import numpy as np
import torch


class Scorer:
    """clip_score from `embed_images` / `embed_texts` (unit vectors): ours and Hugging Face CLIPs alike."""

    def similarity(self, images: np.ndarray | torch.Tensor, prompts: list[str]) -> np.ndarray:
        """100 * cos(image, prompt) per pair, unclamped: rerank orders by it (clamping at 0 ties every candidate
        a CLIP finds unrelated)."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        cos = (self.embed_images(images) * self.embed_texts(prompts)).sum(-1)
        return (100 * cos).float().cpu().numpy()

    def score(self, images: np.ndarray | torch.Tensor, prompts: list[str]) -> np.ndarray:
        """torchmetrics' CLIPScore per pair: max(100 * cos(image, prompt), 0)."""
        return np.maximum(self.similarity(images, prompts), 0)

    def score_and_embed(self, images: np.ndarray | torch.Tensor, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(clip_score per pair, the images' unit embeddings as float32 (N, D)): one image pass for both."""
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        img = self.embed_images(images)
        cos = (img * self.embed_texts(prompts)).sum(-1)
        return np.maximum((100 * cos).float().cpu().numpy(), 0), img.float().cpu().numpy()
