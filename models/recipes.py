"""Training recipes, one per model kind: pure torch, so they run in a notebook or inside Ray Train.

A recipe owns its modules and optimizers and exposes `step(batch, step)` -> losses, `state()` /
`load_state()` (flat tensor dicts, saved as safetensors: no pickle even for optimizer state) and
`export(url)` (the inference checkpoint). Gradients are all-reduced by hand when torch.distributed is
up, which is DDP's arithmetic without wrapping modules (the GAN calls D.features / D.logits directly).
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from models.checkpoint import save_checkpoint
from models.clip import CLIP, CLIPConfig, CLIPScorer
from models.gan import (
    Discriminator,
    FeatureDiscriminator,
    GANConfig,
    GANGenerator,
    caption_features,
    d_loss,
    feature_d_loss,
    g_loss,
    sentence,
)
from models.gan import Generator as GANNet
from models.judge import Judge, JudgeConfig
from models.shapes import hard_negatives
from models.tokenizer import WordTokenizer
from models.transformer import DalleTransformer, TransformerConfig, TransformerGenerator
from models.vq import VQConfig, VQModel


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, 3, H, W)
    captions: list[str]
    labels: dict[str, torch.Tensor] = field(default_factory=dict)  # judge targets
    tokens: torch.Tensor | None = None  # transformer: precomputed VQ codes (B, grid*grid)

    @property
    def pixels(self) -> torch.Tensor:
        return self.images.float() / 127.5 - 1

    def to(self, device: torch.device) -> Batch:
        return Batch(self.images.to(device, non_blocking=True), self.captions,
                     {k: v.to(device) for k, v in self.labels.items()},
                     None if self.tokens is None else self.tokens.to(device))


def sync_grads(params) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= world


def _opt_state(prefix: str, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for k, v in st.items():
            out[f"{prefix}.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def _load_opt(prefix: str, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        if key.startswith(prefix + "."):
            _, idx, k = key.rsplit(".", 2)
            state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


class Recipe:
    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    device: torch.device = torch.device("cpu")

    def to(self, device: torch.device | str) -> Recipe:
        """Move every module (parameters in place, so the optimizers keep pointing at them); batches and
        fresh tensors (tokens, noise) follow `self.device`."""
        self.device = torch.device(device)
        for m in self.modules.values():
            m.to(self.device)
        return self

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, m in self.modules.items():
            out.update({f"{name}.{k}": v for k, v in m.state_dict().items()})
        for name, o in self.optimizers.items():
            out.update(_opt_state(f"opt_{name}", o))
        return {k: v.detach().cpu() for k, v in out.items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, m in self.modules.items():
            m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        for name, o in self.optimizers.items():
            _load_opt(f"opt_{name}", o, tensors)


class JudgeRecipe(Recipe):
    def __init__(self, cfg: JudgeConfig, lr: float = 2e-3, **_) -> None:
        self.model = Judge(cfg)
        self.modules = {"judge": self.model}
        self.optimizers = {"judge": torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=1e-4)}

    def step(self, b: Batch, step: int) -> dict[str, float]:
        self.model.train()
        loss = self.model.loss(b.images, b.labels)
        opt = self.optimizers["judge"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(self.model.parameters())
        opt.step()
        return {"loss": loss.item()}

    def export(self, url: str, storage_options: dict | None = None) -> None:
        save_checkpoint(url, self.model.state_dict(), self.model.config(), storage_options)


class VQRecipe(Recipe):
    def __init__(self, cfg: VQConfig, lr: float = 1e-3, edge_weight: float = 0.5, **_) -> None:
        self.model, self.edge_weight = VQModel(cfg), edge_weight
        self.modules = {"vq": self.model}
        self.optimizers = {"vq": torch.optim.Adam(self.model.parameters(), lr=lr)}

    def step(self, b: Batch, step: int) -> dict[str, float]:
        self.model.train()
        x = b.pixels
        recon, idx, commit = self.model(x)
        mse = F.mse_loss(recon, x)
        # edge-aware term: small triangles blur into blobs under MSE alone
        edge = sum(F.l1_loss(torch.diff(recon, dim=d), torch.diff(x, dim=d)) for d in (2, 3))
        loss = mse + self.edge_weight * edge + commit
        opt = self.optimizers["vq"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(self.model.parameters())
        opt.step()
        usage = idx.unique().numel() / self.model.cfg.codebook_size
        return {"loss": loss.item(), "mse": mse.item(), "batch_code_usage": usage}

    def export(self, url: str, storage_options: dict | None = None) -> None:
        save_checkpoint(url, self.model.state_dict(), {"family": "vq", "config": asdict(self.model.cfg)}, storage_options)


def cosine_lr(step: int, lr: float, warmup: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(frac * math.pi)))


def drop_captions(captions: list[str], p: float, rng: random.Random) -> list[str]:
    """Caption dropout: an empty caption encodes to all padding = the unconditional model."""
    return ["" if rng.random() < p else c for c in captions]


class TransformerRecipe(Recipe):
    def __init__(self, cfg: TransformerConfig, vq: VQModel, vq_cfg: VQConfig, tokenizer: WordTokenizer,
                 lr: float = 6e-4, caption_dropout: float = 0.1, warmup: int = 200, steps: int = 5000,
                 seed: int = 0, **_) -> None:
        self.cfg, self.vq, self.vq_cfg, self.tokenizer = cfg, vq, vq_cfg, tokenizer
        self.model = DalleTransformer(cfg)
        self.caption_dropout, self.lr, self.warmup, self.steps, self.seed = caption_dropout, lr, warmup, steps, seed
        self.modules = {"transformer": self.model}
        self.optimizers = {"transformer": torch.optim.AdamW(self.model.parameters(), lr=lr, betas=(0.9, 0.95),
                                                            weight_decay=0.01)}

    def step(self, b: Batch, step: int) -> dict[str, float]:
        self.model.train()
        caps = drop_captions(b.captions, self.caption_dropout, random.Random(f"{self.seed}/{step}"))
        loss = self.model.loss(self.tokenizer.encode_batch(caps).to(self.device), b.tokens)
        opt = self.optimizers["transformer"]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, self.lr, self.warmup, self.steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(self.model.parameters())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        opt.step()
        return {"loss": loss.item()}

    def export(self, url: str, storage_options: dict | None = None, dtype: torch.dtype | None = None) -> None:
        g = TransformerGenerator(self.cfg, self.vq_cfg, self.tokenizer, self.model, self.vq, torch.device("cpu"))
        save_checkpoint(url, g.state_dict(), g.config(), storage_options, dtype)


def negative_tokens(tokenizer: WordTokenizer, captions: list[str], seed: int, step: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Hard-negative captions (`models.shapes.hard_negatives`: one attribute changed, plus each attribute the two
    objects differ in swapped between them), drawn from (seed, step) so a resumed run sees the same ones:
    (rows, tokens), rows[i] = the caption that tokens[i] negates; None when no caption allows one."""
    rng = random.Random(f"{seed}/{step}")
    pairs = [(i, n) for i, c in enumerate(captions) for n in hard_negatives(c, rng)]
    if not pairs:
        return None
    rows, negs = zip(*pairs)
    return torch.tensor(rows, device=device), tokenizer.encode_batch(list(negs)).to(device)


def shifted(images: torch.Tensor, pixels: float) -> torch.Tensor:
    """Each image translated by up to `pixels` (uniform, border-padded, differentiable): G must satisfy CLIP
    under small shifts, so it cannot get there with pixel-exact adversarial patterns."""
    if not pixels:
        return images
    n, _, h, w = images.shape
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1
    theta[:, :, 2] = (torch.rand(n, 2, device=images.device) * 2 - 1) * 2 * pixels / torch.tensor([w, h], device=images.device)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="border", align_corners=False)


def mode_seeking_ratio(G: nn.Module, fake: torch.Tensor, z: torch.Tensor, sent: torch.Tensor,
                       w: torch.Tensor | None = None, pad: torch.Tensor | None = None) -> torch.Tensor:
    """MSGAN's ratio |G(z1, c) - G(z2, c)| / |z1 - z2| on the first half of the batch (fake = G(z, sent)) with
    fresh noise: G is rewarded for drawing different images from different noise for one caption."""
    n = max(1, z.size(0) // 2)
    z2 = torch.randn_like(z[:n])
    more = () if w is None else (w[:n], pad[:n])
    return (fake[:n] - G(z2, sent[:n], *more)).abs().mean() / (z[:n] - z2).abs().mean()


class GANRecipe(Recipe):
    """DF-GAN's losses with a frozen pretrained sentence encoder (CLIP's text tower, DF-GAN's DAMSM role),
    plus LAFITE's contrastive term: G's images go through the frozen CLIP image tower and must pick their
    own caption over the batch's others and a hard negative (one attribute swapped). Adam(0.5, 0.999) at 2e-4
    for both (DF-GAN's Adam(0, 0.9), 1e-4 / 4e-4 made G saturate within 300 steps on the shapes data);
    the EMA generator warms up (decay (1 + t) / (10 + t)) so early exports do not carry the random init.
    `vision_d=W` adds a second, vision-aided discriminator on the frozen CLIP image tower's feature maps
    (`models.gan.FeatureDiscriminator`) to both losses with weight W. `recon=W` adds pix2pix's paired L1
    term, W * |G(z, caption) - the caption's own image|: dense per-pixel supervision that pulls G towards the
    caption's conditional mean, sharp where a caption fixes its image up to small jitter (the shapes domain),
    blurry where it does not (natural photos: keep it 0 there). `text_lr=LR` fine-tunes G's own copy of the
    CLIP text tower at LR through G's losses (D and CLIP's scoring keep reading fixed features): CLIP's sentence
    vector names both shapes of a two-object caption but barely says which one is where."""

    def __init__(self, cfg: GANConfig, clip: CLIPScorer, lr_g: float = 2e-4, lr_d: float = 2e-4,
                 ema: float = 0.999, betas: tuple[float, float] = (0.5, 0.999), clip_weight: float = 1.0,
                 clip_shift: float = 2.0, hard_negatives: bool = True, d_hard_negatives: bool = False,
                 mode_seeking: float = 0.0, recon: float = 0.0, text_lr: float = 0.0, vision_d: float = 0.0,
                 vision_width: int = 32, seed: int = 0, **_) -> None:
        self.cfg, self.tokenizer, self.ema_decay, self.mode_seeking = cfg, clip.tokenizer, ema, mode_seeking
        self.clip_weight, self.clip_shift, self.hard_negatives, self.seed = clip_weight, clip_shift, hard_negatives, seed
        self.d_hard_negatives, self.recon = d_hard_negatives, recon
        self.clip = clip.model.eval().requires_grad_(False)
        self.G, self.D = GANNet(cfg), Discriminator(cfg)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.modules = {"G": self.G, "D": self.D, "G_ema": self.G_ema, "clip": self.clip}
        g_params = [{"params": self.G.parameters()}]
        self.text, self.text_ema = self.clip.text, self.clip.text  # G's caption encoder: CLIP's, frozen ...
        if text_lr:  # ... or its own fine-tuned copy, averaged like G for export
            self.text = copy.deepcopy(self.clip.text).requires_grad_(True)
            self.text_ema = copy.deepcopy(self.clip.text).requires_grad_(False)
            self.modules |= {"text": self.text, "text_ema": self.text_ema}
            g_params.append({"params": self.text.parameters(), "lr": text_lr})
        self.optimizers = {"G": torch.optim.Adam(g_params, lr=lr_g, betas=tuple(betas)),
                           "D": torch.optim.Adam(self.D.parameters(), lr=lr_d, betas=tuple(betas))}
        self.vision_d = vision_d
        if vision_d:
            self.Dv = FeatureDiscriminator(self.clip.image, cfg.text_dim, vision_width)
            self.modules["D_vision"] = self.Dv
            self.optimizers["D_vision"] = torch.optim.Adam(self.Dv.parameters(), lr=lr_d, betas=tuple(betas))

    def step(self, b: Batch, step: int) -> dict[str, float]:
        real = b.pixels
        tokens = self.tokenizer.encode_batch(b.captions).to(self.device)
        with torch.set_grad_enabled(self.text is not self.clip.text):
            sent, w, pad = caption_features(self.text, tokens, self.cfg.word_attn)
        with torch.no_grad():
            wanted = self.d_hard_negatives or (self.clip_weight and self.hard_negatives)
            hard = negative_tokens(self.tokenizer, b.captions, self.seed, step, self.device) if wanted else None
            d_hard = (hard[0], sentence(self.text, hard[1])) if hard is not None and self.d_hard_negatives else None
        z = torch.randn(real.size(0), self.cfg.noise_dim, device=self.device)
        fake = self.G(z, sent, w, pad)
        sent_d = sent.detach()  # D's condition; only G's losses train a fine-tuned text tower
        # D: real/matching vs fake and vs mismatched captions, MA-GP
        ld, logs = d_loss(self.D, real, fake, sent_d, hard=d_hard)
        sent_d = sent_d.detach()  # d_loss made it require grad for MA-GP
        if self.vision_d:
            logs["d_vision"] = (ldv := feature_d_loss(self.Dv, real.detach(), fake, sent_d)).item()
            ld = ld + self.vision_d * ldv
        d_nets = [(self.D, self.optimizers["D"])] + ([(self.Dv, self.optimizers["D_vision"])] if self.vision_d else [])
        for _, opt in d_nets:
            opt.zero_grad(set_to_none=True)
        ld.backward()
        for net, opt in d_nets:
            sync_grads(net.parameters())
            opt.step()
        # G: fool D, and let CLIP find its caption
        lg = g_loss(self.D, fake, sent_d)
        if self.vision_d:
            logs["g_vision"] = (lgv := -self.Dv.logits(self.Dv.features(fake), sent_d).mean()).item()
            lg = lg + self.vision_d * lgv
        if self.clip_weight:
            negs = hard[1] if hard is not None and self.hard_negatives else None  # drawn for D alone when off
            lc = self.clip.loss(shifted(fake, self.clip_shift), tokens, negs)
            logs["g_clip"] = lc.item()
            lg = lg + self.clip_weight * lc
        if self.recon:
            logs["g_recon"] = (l1 := (fake - real.detach()).abs().mean()).item()
            lg = lg + self.recon * l1
        if self.mode_seeking:
            logs["g_ms"] = (ms := mode_seeking_ratio(self.G, fake, z, sent, w, pad)).item()
            lg = lg + self.mode_seeking / (ms + 1e-5)
        opt_g = self.optimizers["G"]
        opt_g.zero_grad(set_to_none=True)
        lg.backward()
        sync_grads(p for group in opt_g.param_groups for p in group["params"])
        opt_g.step()
        decay = min(self.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            averaged = [(self.G_ema, self.G)] + ([(self.text_ema, self.text)] if self.text is not self.text_ema else [])
            for avg, net in averaged:
                for pe, p in zip(avg.parameters(), net.parameters()):
                    pe.lerp_(p, 1 - decay)
                for be, bb in zip(avg.buffers(), net.buffers()):
                    be.copy_(bb)
        return {"loss_d": ld.item(), "loss_g": lg.item(), **logs}

    def export(self, url: str, storage_options: dict | None = None, dtype: torch.dtype | None = None) -> None:
        g = GANGenerator(self.cfg, self.clip.cfg, self.tokenizer, self.text_ema, self.G_ema, torch.device("cpu"))
        save_checkpoint(url, g.state_dict(), g.config(), storage_options, dtype)


class CLIPRecipe(Recipe):
    """CLIP's symmetric InfoNCE plus one hard-negative caption per image where the caption allows one."""

    def __init__(self, cfg: CLIPConfig, tokenizer: WordTokenizer, lr: float = 1e-3, warmup: int = 200,
                 steps: int = 3000, hard_negatives: bool = True, seed: int = 0, **_) -> None:
        self.cfg, self.tokenizer, self.lr, self.warmup, self.steps = cfg, tokenizer, lr, warmup, steps
        self.hard_negatives, self.seed = hard_negatives, seed
        self.model = CLIP(cfg)
        self.modules = {"clip": self.model}
        self.optimizers = {"clip": torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.05)}

    def step(self, b: Batch, step: int) -> dict[str, float]:
        self.model.train()
        hard = negative_tokens(self.tokenizer, b.captions, self.seed, step, self.device) if self.hard_negatives else None
        negs = None if hard is None else hard[1]
        opt = self.optimizers["clip"]
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, self.lr, self.warmup, self.steps)
        loss = self.model.loss(b.images, self.tokenizer.encode_batch(b.captions).to(self.device), negs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        sync_grads(self.model.parameters())
        opt.step()
        return {"loss": loss.item(), "logit_scale": self.model.logit_scale.exp().item()}

    def export(self, url: str, storage_options: dict | None = None, dtype: torch.dtype | None = None) -> None:
        s = CLIPScorer(self.model, self.tokenizer)
        save_checkpoint(url, s.state_dict(), s.config(), storage_options, dtype)
