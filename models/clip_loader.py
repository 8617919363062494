"""`load_clip`: our CLIP checkpoint or a Hugging Face CLIP directory, told apart by its config.json."""

from __future__ import annotations

import json

import fsspec
import torch
from promptmill.models.checkpoint import load_module
from promptmill.models.clip import CLIP, CLIPConfig, CLIPScorer
from promptmill.models.tokenizer import WordTokenizer


def load_clip(url: str, device: torch.device | str = "cpu", storage_options: dict | None = None):
    """Our CLIP checkpoint, or a Hugging Face CLIP directory (its config.json says model_type "clip"): both score
    with `.score(images, prompts)` by torchmetrics' CLIPScore definition."""
    if _is_hf_clip(url, storage_options):
        from promptmill.models.hf_clip import load_hf_clip  # transformers: the optional extra

        return load_hf_clip(url, device, storage_options)
    config, model = load_module(url, "clip", lambda c: CLIP(CLIPConfig(**c["config"])), storage_options)
    return CLIPScorer(model, WordTokenizer.from_config(config["tokenizer"]), device)


def _is_hf_clip(url: str, storage_options: dict | None) -> bool:
    try:
        with fsspec.open(f"{url.rstrip('/')}/config.json", "rb", **(storage_options or {})) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return False  # the loader below names what is missing or broken
    return isinstance(config, dict) and "family" not in config and config.get("model_type") == "clip"
