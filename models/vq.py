"""VQ image tokenizer (DALL-E's dVAE role): 32x32 RGB <-> 8x8 grid of discrete codes.

Conv encoder/decoder with residual blocks and an EMA codebook (VQ-VAE-2 style updates) with dead-code
restarts: a code whose EMA usage falls below `dead_threshold` is re-seeded from a random encoder output
of the current batch, which keeps codebook usage high on a small dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from promptmill.models.checkpoint import load_module


@dataclass
class VQConfig:
    image_size: int = 32
    hidden: int = 64
    embed_dim: int = 64
    codebook_size: int = 256
    downsample: int = 4  # 32 / 4 = 8x8 tokens
    decay: float = 0.99
    commitment: float = 0.25
    dead_threshold: float = 0.05

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, 1, 1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class EMAQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        embed = torch.randn(cfg.codebook_size, cfg.embed_dim).mul_(0.1)  # in place: on the meta device an
        # out-of-place op runs torch's Python decompositions, which import torch._dynamo (checkpoint.on_meta)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.ones(cfg.codebook_size))
        self.register_buffer("embed_avg", embed.clone())

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D, H, W) -> (N, H, W) nearest code indices."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.size(1))
        d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ self.embed.t() + self.embed.pow(2).sum(1)[None]
        return d.argmin(1).view(z.size(0), z.size(2), z.size(3))

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """(N, H, W) indices -> (N, D, H, W) code vectors."""
        return F.embedding(idx, self.embed).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.codes(z)
        q = self.lookup(idx)
        if self.training:
            self._ema_update(z, idx)
        commit = self.cfg.commitment * F.mse_loss(z, q.detach())
        return z + (q - z).detach(), idx, commit  # straight-through estimator

    @torch.no_grad()
    def _ema_update(self, z: torch.Tensor, idx: torch.Tensor) -> None:
        cfg = self.cfg
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.size(1))
        onehot = F.one_hot(idx.view(-1), cfg.codebook_size).type_as(flat)
        self.cluster_size.mul_(cfg.decay).add_(onehot.sum(0), alpha=1 - cfg.decay)
        self.embed_avg.mul_(cfg.decay).add_(onehot.t() @ flat, alpha=1 - cfg.decay)
        n = self.cluster_size.sum()
        size = (self.cluster_size + 1e-5) / (n + cfg.codebook_size * 1e-5) * n  # Laplace smoothing
        self.embed.copy_(self.embed_avg / size.unsqueeze(1))
        dead = self.cluster_size < cfg.dead_threshold
        if dead.any():
            pick = torch.randint(0, flat.size(0), (int(dead.sum()),), device=flat.device)
            self.embed[dead] = flat[pick]
            self.embed_avg[dead] = flat[pick]
            self.cluster_size[dead] = 1.0


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n = int(math.log2(cfg.downsample))
        h = cfg.hidden
        enc: list[nn.Module] = [nn.Conv2d(3, h, 3, 1, 1), ResBlock(h)]
        dec: list[nn.Module] = [nn.Conv2d(cfg.embed_dim, 2 * h, 3, 1, 1), ResBlock(2 * h)]
        for i in range(n):
            enc += [nn.Conv2d(h if i == 0 else 2 * h, 2 * h, 4, 2, 1), ResBlock(2 * h)]
            dec += [nn.ConvTranspose2d(2 * h, 2 * h if i < n - 1 else h, 4, 2, 1),
                    ResBlock(2 * h if i < n - 1 else h)]
        enc += [nn.ReLU(), nn.Conv2d(2 * h, cfg.embed_dim, 1)]
        dec += [nn.ReLU(), nn.Conv2d(h, 3, 3, 1, 1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)
        self.quantizer = EMAQuantizer(cfg)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x in [-1, 1] -> (reconstruction, codes, commitment loss)."""
        q, idx, commit = self.quantizer(self.encoder(x))
        return self.decoder(q), idx, commit

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, grid*grid) token ids, row-major."""
        return self.quantizer.codes(self.encoder(x)).flatten(1)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, grid*grid) token ids -> (N, 3, H, W) in [-1, 1]."""
        g = self.cfg.grid
        return self.decoder(self.quantizer.lookup(tokens.view(-1, g, g))).clamp(-1, 1)


def load_vq(url: str, device: torch.device | str = "cpu", storage_options: dict | None = None) -> VQModel:
    """A VQ checkpoint directory (config.json + model.safetensors), in eval mode on `device`."""
    return load_module(url, "vq", lambda c: VQModel(VQConfig(**c["config"])), storage_options)[1].to(device)
