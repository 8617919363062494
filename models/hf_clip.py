"""A Hugging Face CLIP directory (`CLIPModel` + processor files: openai/clip-vit-*, OpenCLIP/LAION exports) as a
scorer: `clip_score` with torchmetrics' CLIPScore definition, 100 * max(cos(image, text), 0), preprocessing as
torchmetrics does it (the processor gets CHW uint8 tensors; captions truncated to the text tower's positions).
Needs the optional extra `promptmill[diffusers]` (transformers).
"""

from __future__ import annotations

import os

import numpy as np
import torch
from promptmill.models.checkpoint import CheckpointError
from promptmill.models.images import to_nchw
from promptmill.models.local_cache import local_copy, refuse_pickled_weights
from promptmill.models.scorer import Scorer


def _features(out) -> torch.Tensor:
    """transformers returns a tensor or, in some versions and models, an output object holding the embeddings."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("image_embeds", "text_embeds", "pooler_output"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    raise TypeError(f"unexpected CLIP feature output {type(out).__name__}")


class HFCLIPScorer(Scorer):
    def __init__(self, model, processor, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.model, self.processor = model.to(self.device).eval(), processor
        self.max_len = getattr(getattr(model.config, "text_config", None), "max_position_embeddings", None)

    @torch.no_grad()
    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, H, W, 3) as the generators return them -> unit vectors."""
        x = self.processor(images=list(to_nchw(np.asarray(images))), return_tensors="pt")["pixel_values"]
        f = _features(self.model.get_image_features(pixel_values=x.to(self.device)))
        return f / f.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        t = self.processor(text=list(prompts), return_tensors="pt", padding=True)
        ids, mask = t["input_ids"], t["attention_mask"]
        if self.max_len is not None:
            ids, mask = ids[:, :self.max_len], mask[:, :self.max_len]
        f = _features(self.model.get_text_features(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)))
        return f / f.norm(dim=-1, keepdim=True)


def load_hf_clip(url: str, device: torch.device | str = "cpu", storage_options: dict | None = None) -> HFCLIPScorer:
    os.environ["HF_HUB_OFFLINE"] = "1"  # never a hub download at run time
    try:
        from transformers import CLIPModel, CLIPProcessor
    except ImportError as e:
        raise CheckpointError("a Hugging Face CLIP needs the optional extra: pip install 'promptmill[diffusers]'") from e
    local = local_copy(url, storage_options)
    refuse_pickled_weights(local, url)
    try:
        return HFCLIPScorer(CLIPModel.from_pretrained(local, use_safetensors=True), CLIPProcessor.from_pretrained(local),
                            device)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {url!r}: not a loadable Hugging Face CLIP directory ({e})") from e
