"""Generator interface on tiny random checkpoints: shapes, seeds, batch invariance, KV cache, storage."""

import json

import numpy as np
import pytest
import torch

from models import CheckpointError, load_generator
from models.sampling import filter_logits

PROMPTS = ["a small red circle on the left", "a large blue square above a green triangle", "out of domain words",
           "", "big yellow triangle, top", "a red circle", "a red circle"]


@pytest.mark.parametrize("family", ["gan", "transformer"])
def test_generate_shapes_and_seeds(checkpoints, family):
    g = load_generator(checkpoints[family], "cpu")
    out = g.generate(PROMPTS, list(range(len(PROMPTS))))
    assert out.shape == (7, g.height, g.width, 3) and out.dtype == np.uint8
    again = g.generate(PROMPTS, list(range(len(PROMPTS))))
    assert np.array_equal(out, again)  # same seed -> same image
    assert not np.array_equal(out[5], out[6]) or family == "transformer" and out[5].std() == 0
    other = g.generate(PROMPTS[5:6], [12345])
    assert not np.array_equal(other[0], out[5])  # different seed -> different image


@pytest.mark.parametrize("family", ["gan", "transformer"])
def test_batch_invariance(checkpoints, family):
    g = load_generator(checkpoints[family], "cpu")
    seeds = [11, 22, 33, 44, 55, 66, 77]
    batched = g.generate(PROMPTS, seeds)
    single = np.stack([g.generate([p], [s])[0] for p, s in zip(PROMPTS, seeds)])
    assert np.array_equal(batched, single)


def test_kv_cache_equals_no_cache(checkpoints):
    g = load_generator(checkpoints["transformer"], "cpu")
    text = g.tokenizer.encode_batch(PROMPTS[:3])
    u = torch.rand(3, g.cfg.image_tokens, generator=torch.Generator().manual_seed(0))
    for kw in ({}, {"guidance_scale": 3.0, "top_k": 5}, {"top_p": 0.8, "temperature": 0.7}):
        a = g.model.sample_tokens(text, u, use_cache=True, **kw)
        b = g.model.sample_tokens(text, u, use_cache=False, **kw)
        assert torch.equal(a, b), kw


def test_filter_logits():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]  # p(0)=0.64 < 0.7 so token 1 is needed


def test_sampling_params_are_validated(checkpoints):
    g = load_generator(checkpoints["gan"], "cpu")
    with pytest.raises(ValueError, match="top_k"):
        g.generate(["a"], [0], top_k=3)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        g.generate(["a", "b"], [0])


def test_missing_and_corrupt_checkpoints(checkpoints, tmp_path):
    import shutil

    with pytest.raises(CheckpointError, match="missing config.json"):
        load_generator(str(tmp_path / "nope"))
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["gan"], bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupt"):
        load_generator(str(bad))
    shutil.copy(checkpoints["transformer"] + "/model.safetensors", bad / "model.safetensors")
    with pytest.raises(CheckpointError, match="do not match"):
        load_generator(str(bad))
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "family": "diffusion"}))
    with pytest.raises(CheckpointError, match="unknown generator family 'diffusion'"):
        load_generator(str(bad))


def test_checkpoint_round_trip_through_moto_s3(checkpoints, s3):
    from conftest import save_tiny

    url = save_tiny("s3://bucket/ckpt/gan", "gan", s3)
    local, remote = load_generator(checkpoints["gan"], "cpu"), load_generator(url, "cpu", s3)
    assert np.array_equal(local.generate(PROMPTS, list(range(7))), remote.generate(PROMPTS, list(range(7))))


def test_forward_backward_shapes_of_every_model():
    from models.clip import CLIPConfig, TextTower
    from models.gan import Discriminator, GANConfig, Generator, d_loss, g_loss, sentence
    from models.judge import HEADS, Judge, JudgeConfig
    from models.transformer import DalleTransformer, TransformerConfig
    from models.vq import VQConfig, VQModel

    x = torch.rand(4, 3, 32, 32) * 2 - 1
    vq = VQModel(VQConfig(hidden=8, embed_dim=8, codebook_size=16))
    recon, idx, commit = vq(x)
    assert recon.shape == x.shape and idx.shape == (4, 8, 8)
    (recon.pow(2).mean() + commit).backward()
    assert vq.encode(x).shape == (4, 64) and vq.decode(vq.encode(x)).shape == x.shape

    tf = DalleTransformer(TransformerConfig(text_vocab=10, text_len=6, image_vocab=16, n_layer=1, n_head=2, n_embd=16))
    text, img = torch.randint(0, 10, (4, 6)), torch.randint(0, 16, (4, 64))
    assert tf(text, img).shape == (4, 64, 16)
    tf.loss(text, img).backward()

    cfg = GANConfig(text_dim=16, noise_dim=8, ngf=4, ndf=4)
    te = TextTower(CLIPConfig(vocab_size=10, text_len=6, width=16, layers=1, heads=2, embed_dim=16))
    G, D = Generator(cfg), Discriminator(cfg)
    sent = sentence(te, text).detach()
    fake = G(torch.randn(4, 8), sent)
    assert sent.shape == (4, 16) and fake.shape == (4, 3, 32, 32)
    assert torch.allclose(sent.norm(dim=1), torch.full((4,), 4.0))  # unit embedding * sqrt(16)
    ld, _ = d_loss(D, x, fake, sent)
    ld.backward()
    g_loss(D, fake, sent).backward()
    assert all(p.grad is not None for p in [*G.parameters(), *D.parameters()])

    j = Judge(JudgeConfig(width=4, features=8))
    out = j(x)
    assert set(out) == set(HEADS) and j.features(x).shape == (4, 8)


def test_clip_shift_moves_each_image_by_at_most_the_given_pixels():
    from models.recipes import shifted

    torch.manual_seed(0)
    x = torch.full((64, 3, 32, 32), -1.0)
    x[:, :, 12:20, 12:20] = 1.0  # a square centred at 15.5
    assert shifted(x, 0) is x
    y = shifted(x, 2.0)
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    mass = (y[:, 0] + 1) / 2
    cx = (mass * xs).sum((1, 2)) / mass.sum((1, 2))
    cy = (mass * ys).sum((1, 2)) / mass.sum((1, 2))
    assert (cx - 15.5).abs().max() <= 2.01 and (cy - 15.5).abs().max() <= 2.01
    assert (cx - 15.5).abs().max() > 1.0  # it does move them, and not all alike
    assert cx.std() > 0.3 and cy.std() > 0.3


@pytest.mark.parametrize("text_in_fc", [False, True])
def test_gan_first_map_takes_the_caption_only_when_text_in_fc(text_in_fc):
    from models.gan import GANConfig, Generator

    torch.manual_seed(0)
    g = Generator(GANConfig(text_dim=16, noise_dim=8, ngf=4, text_in_fc=text_in_fc))
    seen = []
    g.fc.register_forward_hook(lambda m, i, o: seen.append(o))
    g(torch.randn(1, 8).expand(2, 8), torch.randn(2, 16))  # same noise, two captions
    assert torch.equal(seen[0][0], seen[0][1]) is not text_in_fc


def test_mode_seeking_ratio_is_zero_for_a_generator_that_ignores_its_noise():
    from models.gan import GANConfig, Generator
    from models.recipes import mode_seeking_ratio

    torch.manual_seed(0)
    z, sent = torch.randn(8, 8), torch.randn(8, 16)
    blind = lambda z, s: s.sum(1).view(-1, 1, 1, 1).expand(-1, 3, 4, 4)  # noqa: E731
    assert mode_seeking_ratio(blind, blind(z, sent), z, sent).item() == 0.0
    g = Generator(GANConfig(text_dim=16, noise_dim=8, ngf=4))
    r = mode_seeking_ratio(g, g(z, sent), z, sent)
    r.backward()
    assert r.item() > 0 and g.fc.weight.grad.abs().sum() > 0  # a term G can climb


def test_feature_discriminator_judges_every_location_and_passes_gradient_through_the_frozen_tower():
    from models.clip import CLIP, CLIPConfig
    from models.gan import FeatureDiscriminator, feature_d_loss

    torch.manual_seed(0)
    clip = CLIP(CLIPConfig(image_width=8, embed_dim=16)).requires_grad_(False)
    D = FeatureDiscriminator(clip.image, text_dim=16, width=8)
    img, sent = (torch.rand(3, 3, 32, 32) * 2 - 1).requires_grad_(True), torch.randn(3, 16)
    out = D.logits(D.features(img), sent)
    assert out.shape == (3, 32 * 32 + 16 * 16 + 8 * 8 + 4 * 4)  # one logit per location of each of the 4 stages
    assert set(k.split(".")[0] for k in D.state_dict()) == {"heads"}
    out.mean().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0  # G learns through the tower
    assert all(p.grad is None for p in clip.parameters())
    assert feature_d_loss(D, img.detach(), img.detach().flip(0), sent).item() > 0


def test_word_attention_reads_words_per_location_and_ignores_padding():
    from models.gan import WordAttention

    torch.manual_seed(0)
    att = WordAttention(ch=8, word_dim=16)
    x, w = torch.randn(2, 8, 4, 4), torch.randn(2, 5, 16)
    pad = torch.tensor([[False, False, False, True, True]] * 2)
    assert torch.equal(att(x, w, pad), x)  # a fresh block is the identity
    torch.nn.init.normal_(att.v.weight)
    out = att(x, w, pad)
    ctx = out - x
    assert not torch.allclose(ctx[0, :, 0, 0], ctx[0, :, 3, 3])  # locations read different mixes of words
    w2 = w.clone()
    w2[:, 3:] = torch.randn(2, 2, 16) * 100  # only padded slots change
    assert torch.allclose(att(x, w2, pad), out)
    w3 = w.clone()
    w3[:, 1] += 1  # a real word changes
    assert not torch.allclose(att(x, w3, pad), out)
    assert torch.isfinite(att(x, w, torch.ones(2, 5, dtype=torch.bool))).all()  # empty caption: no NaN


def test_gan_word_dim_must_match_the_text_tower():
    from models.clip import CLIPConfig
    from models.gan import GANConfig, GANGenerator
    from models.tokenizer import WordTokenizer

    tok = WordTokenizer.train(["a red circle"], max_len=6)
    with pytest.raises(ValueError, match="word_dim 64 != the text encoder's width 32"):
        GANGenerator.build(GANConfig(text_dim=16, word_attn=True, word_dim=64),
                           CLIPConfig(vocab_size=len(tok.vocab), text_len=6, width=32, embed_dim=16), tok)


def test_seed_diversity_is_zero_for_one_seed_and_positive_across_seeds(checkpoints):
    from pipelines.eval_models import seed_diversity

    assert seed_diversity(checkpoints["gan"], PROMPTS[:3], seeds=1) == 0
    assert seed_diversity(checkpoints["gan"], PROMPTS[:3], seeds=4) > 0


def test_hard_negatives_pair_each_real_image_with_its_own_caption_changed():
    from models.gan import Discriminator, GANConfig, d_loss
    from models.recipes import negative_tokens
    from models.tokenizer import WordTokenizer

    caps = ["a red circle on the left", "a photo of a dog", "a small blue square above a green triangle"]
    tok = WordTokenizer.train(caps + ["right below yellow large star"], max_len=12)
    rows, negs = negative_tokens(tok, caps, seed=0, step=3, device=torch.device("cpu"))
    # the dog caption names no domain word: no negative; the two-object one also gets its colour and shape swaps
    assert rows.tolist() == [0, 2, 2, 2]
    own = tok.encode_batch([caps[i] for i in rows.tolist()])
    assert all(not torch.equal(n, o) for n, o in zip(negs, own))
    assert torch.equal(negative_tokens(tok, caps, 0, 3, torch.device("cpu"))[1], negs)  # (seed, step) fixes them

    torch.manual_seed(0)
    D = Discriminator(GANConfig(text_dim=16, ndf=4)).eval()  # eval: spectral norm stops its power iteration
    real, fake, sent = torch.rand(3, 3, 32, 32) * 2 - 1, torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 16)
    neg = torch.randn(len(rows), 16)
    _, plain = d_loss(D, real.clone(), fake, sent.clone(), gp_weight=0)
    _, hard = d_loss(D, real.clone(), fake, sent.clone(), gp_weight=0, hard=(rows, neg))
    with torch.no_grad():
        f = D.features(real)
        out_mis = torch.cat([D.logits(f, sent.roll(1, 0)), D.logits(f[rows], neg)])
        out_fake = D.logits(D.features(fake), sent)
        negatives = torch.relu(1 + out_fake).mean() + torch.relu(1 + out_mis).mean()
        expect = torch.relu(1 - D.logits(f, sent)).mean() + 0.5 * negatives
    assert hard["d_hinge"] == pytest.approx(expect.item(), rel=1e-5) and hard["d_hinge"] != plain["d_hinge"]


def test_word_attention_generator_round_trips_and_reads_the_words(tmp_path):
    from models.checkpoint import save_checkpoint
    from models.clip import CLIPConfig
    from models.gan import GANConfig, GANGenerator
    from models.tokenizer import WordTokenizer

    torch.manual_seed(0)
    tok = WordTokenizer.train(PROMPTS, max_len=12)
    text = CLIPConfig(vocab_size=len(tok.vocab), text_len=12, width=32, layers=1, heads=2, embed_dim=32)
    g = GANGenerator.build(GANConfig(text_dim=32, noise_dim=16, ngf=8, text_in_fc=True, word_attn=True, word_dim=32), text, tok)
    plain = g.generate(PROMPTS, list(range(7)))
    for blk in g.gen.blocks:
        torch.nn.init.normal_(blk.attn.v.weight, std=0.5)
    out = g.generate(PROMPTS, list(range(7)))
    assert not np.array_equal(out, plain)  # the words reach the pixels
    save_checkpoint(str(tmp_path / "g"), g.state_dict(), g.config())
    assert np.array_equal(load_generator(str(tmp_path / "g"), "cpu").generate(PROMPTS, list(range(7))), out)
