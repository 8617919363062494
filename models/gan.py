"""Text-conditional GAN in the DF-GAN recipe: one-stage generator with deep text-image fusion.

Generator: noise -> 4x4 -> up-blocks whose every conv is preceded by a fusion block (per-channel
affine from [noise, sentence] as in DF-GAN's DFBLK). Discriminator: down-blocks, then a joint head on
[image features, replicated sentence]. Trained with hinge loss plus mismatched-caption negatives and the
matching-aware gradient penalty (`d_loss`, `g_loss`); sampling uses the EMA generator and truncation.

The sentence encoder is frozen and pretrained, as DF-GAN's DAMSM text encoder is: ours is the text tower of
the shipped CLIP (`models.clip`), whose hard-negative training makes it tell "a blue square" from "a blue
triangle"; a GRU learnt only through D's matching loss did not bind attributes in our 2,500-step budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from promptmill.models.checkpoint import built_with_weights
from promptmill.models.clip import CLIPConfig, TextTower
from promptmill.models.generator import check_inputs, resolved_sampling
from promptmill.models.sampling import per_image_generators, per_image_normal, to_uint8
from promptmill.models.tokenizer import WordTokenizer
from pydantic import BaseModel, ConfigDict, Field


@dataclass
class GANConfig:
    text_dim: int = 128  # = the text encoder's embed_dim
    noise_dim: int = 64
    ngf: int = 32
    ndf: int = 32
    image_size: int = 32  # 4 * 2**k; each doubling adds one up-block
    # DF-GAN projects only the noise to the first 4x4 map, so text can steer layout only through per-channel
    # affines; True projects [noise, sentence] (StackGAN / AttnGAN style) so the caption sets the 4x4 layout
    text_in_fc: bool = False
    # StyleGAN's per-pixel noise after every up-block conv (learned per-channel scale, starting at 0): local
    # variation that does not have to come through the 4x4 map; its draws follow z from the image's own seed
    noise_inject: bool = False


def sentence(text: TextTower, tokens: torch.Tensor) -> torch.Tensor:
    """CLIP's unit sentence embedding scaled by sqrt(dim): O(1) components for the fusion MLPs."""
    e = text(tokens)
    return F.normalize(e, dim=-1) * math.sqrt(e.size(-1))


class Affine(nn.Module):
    def __init__(self, cond_dim: int, ch: int) -> None:
        super().__init__()
        self.gamma = nn.Sequential(nn.Linear(cond_dim, ch), nn.ReLU(inplace=True), nn.Linear(ch, ch))
        self.beta = nn.Sequential(nn.Linear(cond_dim, ch), nn.ReLU(inplace=True), nn.Linear(ch, ch))
        # start as the identity so early training is a plain conv net
        for net, bias in ((self.gamma, 1.0), (self.beta, 0.0)):
            nn.init.zeros_(net[2].weight)
            nn.init.constant_(net[2].bias, bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.gamma(c)[:, :, None, None] * x + self.beta(c)[:, :, None, None]


class Fuse(nn.Module):
    """DF-GAN's DFBLK: affine, lrelu, affine, lrelu; with a parameter-free BatchNorm in front (conditional
    BN), because without it the stacked affines blew activations up and G saturated tanh within 300 steps
    on the shapes data. Eval mode uses running statistics, so sampling stays batch-independent."""

    def __init__(self, cond_dim: int, ch: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(ch, affine=False)
        self.a1, self.a2 = Affine(cond_dim, ch), Affine(cond_dim, ch)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.a1(self.norm(x), c), 0.2)
        return F.leaky_relu(self.a2(x, c), 0.2)


class GBlock(nn.Module):
    def __init__(self, cond_dim: int, cin: int, cout: int, noise: bool = False) -> None:
        super().__init__()
        self.fuse1, self.conv1 = Fuse(cond_dim, cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.fuse2, self.conv2 = Fuse(cond_dim, cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.noise_scale = nn.Parameter(torch.zeros(2, 1, cout, 1, 1)) if noise else None

    def forward(self, x: torch.Tensor, c: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """noise: (B, 2, 2H, 2W), one map per conv, when the block injects noise."""
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.conv1(self.fuse1(x, c))
        if self.noise_scale is not None:
            h = h + self.noise_scale[0] * noise[:, 0:1]
        h = self.conv2(self.fuse2(h, c))
        if self.noise_scale is not None:
            h = h + self.noise_scale[1] * noise[:, 1:2]
        return self.shortcut(x) + h


def _widths(base: int, n: int) -> list[int]:
    """Channel widths from 4x4 upwards: 4b, 4b, 2b, b, b, ... (n + 1 entries)."""
    return [base * max(1, 4 >> max(0, i - 1)) for i in range(n + 1)]


class GANNet(nn.Module):
    """The generator network (G); `GANGenerator` is the inference wrapper behind the generator seam."""

    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        n_up = int(math.log2(cfg.image_size // 4))
        if 4 * 2**n_up != cfg.image_size:
            raise ValueError(f"image_size must be 4 * 2**k, got {cfg.image_size}")
        w = _widths(cfg.ngf, n_up)
        cond = cfg.noise_dim + cfg.text_dim
        self.w0, self.text_in_fc = w[0], cfg.text_in_fc
        fc_in = cond if cfg.text_in_fc else cfg.noise_dim
        self.fc = nn.Linear(fc_in, w[0] * 16)
        self.blocks = nn.ModuleList(GBlock(cond, w[i], w[i + 1], cfg.noise_inject) for i in range(n_up))
        self.to_rgb = nn.Conv2d(w[-1], 3, 3, 1, 1)
        self.noise_sizes = [2 * (8 << i) ** 2 for i in range(n_up)] if cfg.noise_inject else []

    def forward(self, z: torch.Tensor, sent: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """noise: (B, sum(noise_sizes)) standard normal, drawn here when None (training)."""
        c = torch.cat([z, sent], dim=1)
        x = self.fc(c if self.text_in_fc else z).view(z.size(0), self.w0, 4, 4)
        if self.noise_sizes and noise is None:
            noise = torch.randn(z.size(0), sum(self.noise_sizes), device=z.device)
        maps = noise.split(self.noise_sizes, dim=1) if self.noise_sizes else [None] * len(self.blocks)
        for blk, n in zip(self.blocks, maps):
            side = 2 * x.size(-1)
            x = blk(x, c, None if n is None else n.view(-1, 2, side, side))
        return torch.tanh(self.to_rgb(F.leaky_relu(x, 0.2)))


def _sn(m: nn.Module) -> nn.Module:
    """Spectral norm on D's convs: without it, D overpowered G and G collapsed by step 1000 on the shapes data."""
    return nn.utils.parametrizations.spectral_norm(m)


class DBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = _sn(nn.Conv2d(cin, cout, 4, 2, 1)), _sn(nn.Conv2d(cout, cout, 3, 1, 1))
        self.shortcut = _sn(nn.Conv2d(cin, cout, 1))
        # DF-GAN's learnable residual weight; DF-GAN starts it at 0, which leaves D a linear map (shortcut +
        # avg-pool) under one nonlinear head for thousands of steps: G then fooled it with grid-textured mush
        self.gamma = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv2(F.leaky_relu(self.conv1(x), 0.2)), 0.2)
        return F.avg_pool2d(self.shortcut(x), 2) + self.gamma * h


class Discriminator(nn.Module):
    def __init__(self, cfg: GANConfig) -> None:
        super().__init__()
        n_down = int(math.log2(cfg.image_size // 4))
        w = list(reversed(_widths(cfg.ndf, n_down)))
        self.stem = _sn(nn.Conv2d(3, w[0], 3, 1, 1))
        self.feature_size = w[-1] * 4 * 4  # `features` is (B, w[-1], 4, 4)
        self.blocks = nn.Sequential(*(DBlock(w[i], w[i + 1]) for i in range(n_down)))
        self.joint = nn.Sequential(
            _sn(nn.Conv2d(w[-1] + cfg.text_dim, 2 * cfg.ndf, 3, 1, 1)),
            nn.LeakyReLU(0.2, inplace=True),
            _sn(nn.Conv2d(2 * cfg.ndf, 1, 4, 1, 0)),
        )

    def features(self, img: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(img))

    def logits(self, feats: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
        s = sent[:, :, None, None].expand(-1, -1, feats.size(2), feats.size(3))
        return self.joint(torch.cat([feats, s], dim=1)).view(-1)


class AttributeHead(nn.Module):
    """AC-GAN's auxiliary classifier on D's image features: one logit vector per attribute head (training only,
    never exported). D learns it on real images; G pays when its images read otherwise than the caption states."""

    def __init__(self, feature_size: int, head_sizes: dict[str, int], hidden: int = 256) -> None:
        """feature_size: `Discriminator.feature_size`, the flattened width of D's image features."""
        super().__init__()
        self.sizes = head_sizes
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(feature_size, hidden), nn.LeakyReLU(0.2),
                                 nn.Linear(hidden, sum(head_sizes.values())))

    def forward(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.sizes, self.net(feats).split(list(self.sizes.values()), dim=1)))


def hinge(out_real: torch.Tensor, out_fake: torch.Tensor, out_mis: torch.Tensor) -> torch.Tensor:
    """D's hinge: real/matching above +1, fakes and real images with a wrong caption below -1 (half weight each)."""
    return F.relu(1 - out_real).mean() + 0.5 * (F.relu(1 + out_fake).mean() + F.relu(1 + out_mis).mean())


def d_loss(D: Discriminator, real: torch.Tensor, fake: torch.Tensor, sent: torch.Tensor,
           gp_weight: float = 2.0, gp_power: float = 6.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Hinge loss with mismatched-caption negatives + matching-aware gradient penalty (DF-GAN)."""
    real = real.requires_grad_(True)
    sent = sent.requires_grad_(True)
    f_real = D.features(real)
    out_real = D.logits(f_real, sent)
    out_mis = D.logits(f_real, sent.roll(1, dims=0))  # real image, another row's caption
    loss = hinge(out_real, D.logits(D.features(fake.detach()), sent), out_mis)
    grads = torch.autograd.grad(out_real.sum(), (real, sent), create_graph=True)
    norm = torch.cat([g.flatten(1) for g in grads], dim=1).norm(2, dim=1)
    ma_gp = gp_weight * (norm**gp_power).mean()
    return loss + ma_gp, {"d_hinge": loss.item(), "ma_gp": ma_gp.item()}


def g_loss(D: Discriminator, feats: torch.Tensor, sent: torch.Tensor) -> torch.Tensor:
    """feats = D.features(fake), computed once for this and the mode-seeking term."""
    return -D.logits(feats, sent).mean()


class GANSampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    truncation: float | None = Field(default=None, gt=0, description="redraw noise beyond |z| > truncation; None = off")


class GANGenerator:
    """Inference wrapper: tokenizer + frozen text tower + (EMA) generator, one forward pass per batch."""

    family = "gan"
    Sampling = GANSampling

    def __init__(self, cfg: GANConfig, text_cfg: CLIPConfig, tokenizer: WordTokenizer, text: TextTower,
                 gen: GANNet, device: torch.device) -> None:
        self.cfg, self.text_cfg, self.tokenizer, self.device = cfg, text_cfg, tokenizer, device
        self.text, self.gen = text.to(device).eval(), gen.to(device).eval()
        self.height = self.width = cfg.image_size
        self.sampling_defaults: dict = {}  # config.json `sampling`, which `load_generator` sets

    @classmethod
    def build(cls, cfg: GANConfig, text_cfg: CLIPConfig, tokenizer: WordTokenizer,
              device: str | torch.device = "cpu") -> GANGenerator:
        if text_cfg.embed_dim != cfg.text_dim:
            raise ValueError(f"text_dim {cfg.text_dim} != the text encoder's embed_dim {text_cfg.embed_dim}")
        return cls(cfg, text_cfg, tokenizer, TextTower(text_cfg), GANNet(cfg), torch.device(device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**{f"text.{k}": v for k, v in self.text.state_dict().items()},
                **{f"gen.{k}": v for k, v in self.gen.state_dict().items()}}

    def config(self) -> dict:
        return {"family": self.family, "config": asdict(self.cfg), "text": asdict(self.text_cfg),
                "tokenizer": self.tokenizer.to_config(),
                **({"sampling": self.sampling_defaults} if self.sampling_defaults else {})}

    @classmethod
    def from_config(cls, config: dict, device: torch.device) -> GANGenerator:
        """Built from config.json, untrained (the checkpoint loader checks shapes on the meta device with it)."""
        return cls.build(GANConfig(**config["config"]), CLIPConfig(**config["text"]),
                         WordTokenizer.from_config(config["tokenizer"]), device)

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict[str, torch.Tensor], device: torch.device) -> GANGenerator:
        return built_with_weights(lambda: cls.from_config(config, torch.device("meta")),
                                  {"text.": "text", "gen.": "gen"}, tensors, device)

    @torch.inference_mode()
    def generate(self, prompts: list[str], seeds: list[int], **sampling) -> np.ndarray:
        check_inputs(prompts, seeds)
        s = resolved_sampling(self, sampling)
        if not prompts:
            return np.zeros((0, self.height, self.width, 3), np.uint8)
        gens = per_image_generators(seeds)
        z = per_image_normal(gens, (self.cfg.noise_dim,), s.truncation).to(self.device)
        # drawn after z from the same generators: checkpoints without noise keep their images
        noise = per_image_normal(gens, (sum(self.gen.noise_sizes),)).to(self.device) if self.gen.noise_sizes else None
        sent = sentence(self.text, self.tokenizer.encode_batch(prompts).to(self.device))
        return to_uint8(self.gen(z, sent, noise)).cpu().numpy()

