"""CLIP-style contrastive text-image model: the per-image scorer and DALL-E's reranker.

Two towers project into one normalised space; trained with CLIP's symmetric InfoNCE over the batch, plus
caption hard negatives (one attribute word swapped, as NegCLIP does) because random in-batch captions
differ in several attributes at once and teach a bag of words, while a reranker must tell a blue square
from a blue triangle. `CLIPScorer.score` is torchmetrics' CLIPScore: max(100 * cosine, 0).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from promptmill.models.images import as_model_input, to_nchw
from promptmill.models.scorer import Scorer
from promptmill.models.tokenizer import WordTokenizer


@dataclass
class CLIPConfig:
    vocab_size: int = 64
    text_len: int = 24
    width: int = 128  # text transformer width
    layers: int = 2
    heads: int = 4
    image_width: int = 32  # conv base width
    image_size: int = 32
    embed_dim: int = 128


class TextTower(nn.Module):
    """Bidirectional transformer over word tokens; a learned [CLS] slot is the sentence."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.emb = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=0)
        # word and position vectors start at one scale (GPT-2's 0.02). With nn.Embedding's default std 1 the
        # positions were 50x smaller than the words: the tower read captions as bags of words and never learnt
        # which of two objects a swapped colour, shape or size word belongs to (cos 0.98-1.0 between a caption
        # and its swap after 2,500 steps with swap negatives)
        nn.init.normal_(self.emb.weight, std=0.02)
        nn.init.zeros_(self.emb.weight[0])
        self.cls = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos = nn.Parameter(torch.randn(1, cfg.text_len + 1, cfg.width).mul_(0.02))  # in place: vq.EMAQuantizer
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.ln = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.embed_dim, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.hidden(tokens)[:, 0])

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + L, width): the [CLS] slot, then one contextual vector per word (the GAN's word features)."""
        x = torch.cat([self.cls.expand(tokens.size(0), -1, -1), self.emb(tokens)], 1) + self.pos
        pad = torch.cat([torch.zeros_like(tokens[:, :1], dtype=torch.bool), tokens == 0], 1)
        return self.ln(self.encoder(x, src_key_padding_mask=pad))


class ImageTower(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        w, layers = cfg.image_width, []
        chans = [3, w, 2 * w, 4 * w, 4 * w]
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, 1 if i == 0 else 2, 1), nn.GroupNorm(8, chans[i + 1]),
                       nn.GELU()]
        self.conv = nn.Sequential(*layers)
        side = cfg.image_size // 8
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(4 * w * side * side, 256), nn.GELU(),
                                  nn.Linear(256, cfg.embed_dim, bias=False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.conv(images))


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text, self.image = TextTower(cfg), ImageTower(cfg)
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(tokens), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) or float in [-1, 1]."""
        return F.normalize(self.image(as_model_input(images, self.cfg.image_size)), dim=-1)

    def loss(self, images: torch.Tensor, tokens: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
        """Symmetric InfoNCE; `negatives` (M, L) are extra captions every image must score below its own."""
        img = self.encode_image(images)
        txt = self.encode_text(tokens if negatives is None else torch.cat([tokens, negatives]))
        scale = self.logit_scale.clamp(max=float(np.log(100))).exp()
        logits = scale * img @ txt.T  # (B, B + M)
        target = torch.arange(img.size(0), device=img.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, : img.size(0)].T, target)) / 2

    def config(self) -> dict:
        return {"family": "clip", "config": asdict(self.cfg)}


class CLIPScorer(Scorer):
    """A trained CLIP with its tokenizer: prompts and images in, clip_score out."""

    def __init__(self, model: CLIP, tokenizer: WordTokenizer, device: torch.device | str = "cpu") -> None:
        self.model, self.tokenizer, self.device = model.to(device).eval(), tokenizer, torch.device(device)

    @torch.no_grad()
    def embed_images(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) as the generators return them."""
        x = to_nchw(np.asarray(images)).to(self.device)
        return self.model.encode_image(x)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer.encode_batch(prompts).to(self.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def config(self) -> dict:
        return {**self.model.config(), "tokenizer": self.tokenizer.to_config()}
