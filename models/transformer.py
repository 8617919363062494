"""DALL-E-style Transformer: one causal stream of text tokens then VQ image tokens.

nanoGPT-shaped: config, blocks, model, `generate`. Captions are dropped to all-padding during training
(`caption_dropout`) so the same network is also the unconditional model for classifier-free guidance;
conditional and unconditional rows run as one batch. The KV cache is preallocated once and written in
place (min-dalle), so each new image token costs one position, not the whole prefix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from promptmill.models.checkpoint import built_with_weights
from promptmill.models.generator import check_inputs, resolved_sampling
from promptmill.models.sampling import (
    filter_logits,
    guide,
    per_image_generators,
    per_image_uniform,
    sample_with_uniform,
    to_uint8,
)
from promptmill.models.tokenizer import WordTokenizer
from promptmill.models.vq import VQConfig, VQModel
from pydantic import BaseModel, ConfigDict, Field


@dataclass
class TransformerConfig:
    text_vocab: int = 64
    text_len: int = 24
    image_vocab: int = 256
    image_tokens: int = 64
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 256
    dropout: float = 0.0

    @property
    def block_size(self) -> int:
        return self.text_len + self.image_tokens


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, pos: int = 0) -> torch.Tensor:
        """`cache`: (2, B, H, T_max, D) written in place at [pos, pos + T); None = no cache."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            cache[0, :, :, pos : pos + T] = k
            cache[1, :, :, pos : pos + T] = v
            k, v = cache[0, :, :, : pos + T], cache[1, :, :, : pos + T]
        # a prefill (pos == 0) is causal; a one-token step attends to everything cached before it
        causal = T > 1
        if causal and pos > 0:
            raise ValueError("multi-token steps are only supported from position 0")
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.n_embd), nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(),
                                 nn.Linear(4 * cfg.n_embd, cfg.n_embd), nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None, pos: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, pos)
        return x + self.mlp(self.ln2(x))


class DalleTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.text_emb = nn.Embedding(cfg.text_vocab, cfg.n_embd)
        self.image_emb = nn.Embedding(cfg.image_vocab, cfg.n_embd)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.image_vocab, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def _run(self, x: torch.Tensor, pos: int, cache: torch.Tensor | None) -> torch.Tensor:
        x = x + self.pos_emb(torch.arange(pos, pos + x.size(1), device=x.device))
        for i, blk in enumerate(self.blocks):
            x = blk(x, None if cache is None else cache[i], pos)
        return self.head(self.ln_f(x))

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits for every image token: (B, image_tokens, image_vocab)."""
        x = torch.cat([self.text_emb(text), self.image_emb(image[:, :-1])], dim=1)
        return self._run(x, 0, None)[:, self.cfg.text_len - 1 :]

    def loss(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        logits = self(text, image)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), image.reshape(-1))

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        c = self.cfg
        return torch.empty(c.n_layer, 2, batch, c.n_head, c.block_size, c.n_embd // c.n_head,
                           device=device, dtype=dtype)

    @torch.no_grad()
    def sample_tokens(self, text: torch.Tensor, u: torch.Tensor, temperature: float = 1.0,
                      top_k: int | None = None, top_p: float | None = None, guidance_scale: float = 1.0,
                      use_cache: bool = True) -> torch.Tensor:
        """text: (N, text_len); u: (N, image_tokens) uniforms -> (N, image_tokens) image tokens."""
        c = self.cfg
        n = text.size(0)
        guided = guidance_scale != 1.0
        if guided:  # conditional rows then unconditional (all-padding caption) rows, one batch
            text = torch.cat([text, torch.zeros_like(text)])
        rows = text.size(0)
        out = torch.zeros(n, c.image_tokens, dtype=torch.long, device=text.device)
        cache = self.new_cache(rows, text.device, self.pos_emb.weight.dtype) if use_cache else None
        x = self.text_emb(text)
        for t in range(c.image_tokens):
            if use_cache:
                logits = self._run(x, 0 if t == 0 else c.text_len + t - 1, cache)[:, -1]
            else:
                logits = self._run(x, 0, None)[:, -1]
            if guided:
                logits = guide(logits[:n], logits[n:], guidance_scale)
            tok = sample_with_uniform(filter_logits(logits, top_k, top_p), u[:, t], temperature)
            out[:, t] = tok
            nxt = self.image_emb(tok.repeat(2) if guided else tok).unsqueeze(1)
            x = nxt if use_cache else torch.cat([x, nxt], dim=1)
        return out


class TransformerSampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(default=1.0, ge=0, description="softmax temperature; 0 = greedy")
    top_k: int | None = Field(default=None, ge=1, description="keep the k most likely tokens")
    top_p: float | None = Field(default=None, gt=0, le=1, description="nucleus sampling mass")
    guidance_scale: float = Field(default=1.0, ge=0, description="classifier-free guidance; 1 = off")
    use_cache: bool = Field(default=True, description="KV cache (off only for benchmarks and tests)")


class TransformerGenerator:
    """Inference wrapper: tokenizer + transformer + VQ decoder (all in one checkpoint directory)."""

    family = "transformer"
    Sampling = TransformerSampling

    def __init__(self, cfg: TransformerConfig, vq_cfg: VQConfig, tokenizer: WordTokenizer,
                 model: DalleTransformer, vq: VQModel, device: torch.device) -> None:
        if (tokenizer.max_len, vq_cfg.grid**2, vq_cfg.codebook_size) != (cfg.text_len, cfg.image_tokens, cfg.image_vocab):
            raise ValueError(f"tokenizer max_len / VQ grid / VQ codebook ({tokenizer.max_len}, {vq_cfg.grid**2}, "
                             f"{vq_cfg.codebook_size}) do not match the transformer's text_len / image_tokens / "
                             f"image_vocab ({cfg.text_len}, {cfg.image_tokens}, {cfg.image_vocab})")
        self.cfg, self.vq_cfg, self.tokenizer, self.device = cfg, vq_cfg, tokenizer, device
        self.model, self.vq = model.to(device).eval(), vq.to(device).eval()
        self.height = self.width = vq_cfg.image_size
        self.sampling_defaults: dict = {}  # config.json `sampling`, which `load_generator` sets

    @classmethod
    def build(cls, cfg: TransformerConfig, vq_cfg: VQConfig, tokenizer: WordTokenizer,
              device: str | torch.device = "cpu") -> TransformerGenerator:
        return cls(cfg, vq_cfg, tokenizer, DalleTransformer(cfg), VQModel(vq_cfg), torch.device(device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"transformer.{k}": v for k, v in self.model.state_dict().items()},
                **{f"vq.{k}": v for k, v in self.vq.state_dict().items()}}

    def config(self) -> dict:
        return {"family": self.family, "config": asdict(self.cfg), "vq": asdict(self.vq_cfg),
                "tokenizer": self.tokenizer.to_config(),
                **({"sampling": self.sampling_defaults} if self.sampling_defaults else {})}

    @classmethod
    def from_config(cls, config: dict, device: torch.device) -> TransformerGenerator:
        """Built from config.json, untrained (the checkpoint loader checks shapes on the meta device with it)."""
        return cls.build(TransformerConfig(**config["config"]), VQConfig(**config["vq"]),
                         WordTokenizer.from_config(config["tokenizer"]), device)

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict[str, torch.Tensor],
                        device: torch.device) -> TransformerGenerator:
        return built_with_weights(lambda: cls.from_config(config, torch.device("meta")),
                                  {"transformer.": "model", "vq.": "vq"}, tensors, device)

    @torch.inference_mode()
    def generate(self, prompts: list[str], seeds: list[int], **sampling) -> np.ndarray:
        check_inputs(prompts, seeds)
        s = resolved_sampling(self, sampling)
        if not prompts:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        text = self.tokenizer.encode_batch(prompts).to(self.device)
        u = per_image_uniform(per_image_generators(seeds), self.cfg.image_tokens).to(self.device)
        tokens = self.model.sample_tokens(text, u, **s.model_dump())
        return to_uint8(self.vq.decode(tokens)).cpu().numpy()

