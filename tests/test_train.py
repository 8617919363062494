"""Training through Ray Train on tiny configs: loss goes down, checkpoints resume, exports load."""

from __future__ import annotations

import json

import pytest

from jobs.dataset import write_shapes
from models import load_generator
from pipelines.train import TrainSpec, run_training

TINY = {
    "judge": {"width": 8, "features": 32},
    "vq": {"hidden": 16, "embed_dim": 16, "codebook_size": 32},
    "gan": {"noise_dim": 16, "ngf": 8, "ndf": 8, "text_in_fc": True, "word_attn": True},  # text/word dims: the CLIP
    "transformer": {"n_layer": 1, "n_head": 2, "n_embd": 32, "text_len": 16},
    "clip": {"width": 32, "layers": 1, "heads": 2, "image_width": 8, "embed_dim": 32},
}


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    write_shapes(str(root / "train"), 512, "train", seed=0)
    return str(root / "train")


def train(kind: str, data: str, tmp_path, steps: int, **kw) -> dict:
    spec = TrainSpec(kind=kind, data=data, out=str(tmp_path / kind), steps=steps, batch_size=32, threads=1,
                     storage_path=str(tmp_path / "ray"), checkpoint_every=10, log_every=5, model=TINY[kind], **kw)
    return run_training(spec)


@pytest.mark.parametrize("kind", ["judge", "vq", "clip"])
def test_loss_goes_down(ray_local, shapes, tmp_path, kind):
    s = train(kind, shapes, tmp_path, 40)
    losses = [h["loss"] for h in s["history"]]
    assert s["steps"] == 40 and losses[-1] < 0.8 * losses[0], losses
    assert (tmp_path / kind / "training" / "loss.png").stat().st_size > 1000


def test_gan_and_transformer_export_generators_and_resume(ray_local, shapes, tmp_path):
    s = train("vq", shapes, tmp_path, 10)
    s = train("transformer", shapes, tmp_path, 20, vq=str(tmp_path / "vq"))
    assert s["history"][-1]["loss"] < s["history"][0]["loss"]
    g = load_generator(str(tmp_path / "transformer"), "cpu")
    assert g.generate(["a red circle"], [0]).shape == (1, 32, 32, 3)
    train("clip", shapes, tmp_path, 10)
    clip = str(tmp_path / "clip")
    s1 = train("gan", shapes, tmp_path, 10, name="gan-resume", clip=clip)
    s2 = train("gan", shapes, tmp_path, 20, name="gan-resume", clip=clip)  # same name: resumes at step 10
    assert [h["step"] for h in s2["history"]] == [5, 10, 15, 20]
    assert s2["history"][:2] == s1["history"]  # the first half is the resumed run's own history
    g = load_generator(str(tmp_path / "gan"), "cpu")
    assert g.generate(["a red circle"], [0], truncation=1.0).shape == (1, 32, 32, 3)
    hist = json.loads((tmp_path / "gan" / "training" / "history.json").read_text())
    assert hist["steps"] == 20 and "g_clip" in hist["final"]


def test_models_that_build_on_another_name_it(tmp_path):
    for kind, needs in (("gan", "clip"), ("transformer", "vq")):
        with pytest.raises(ValueError, match=f"training a {kind} needs {needs}"):
            TrainSpec(kind=kind, data=str(tmp_path), out=str(tmp_path / "out"))


def tiny_gan(shapes: str, max_rows: int, model: dict | None = None, **recipe):
    """A GANRecipe on a tiny untrained CLIP whose tokenizer is trained on `shapes`; returns (recipe, clip, data)."""
    import torch

    from models.clip import CLIP, CLIPConfig, CLIPScorer
    from models.gan import GANConfig
    from models.recipes import GANRecipe
    from models.tokenizer import WordTokenizer
    from pipelines.train import load_data

    torch.manual_seed(0)
    spec = TrainSpec(kind="gan", data=shapes, out=str(shapes), clip="unused", max_rows=max_rows)
    tok = WordTokenizer.train(load_data(spec, None, 0, 1)["captions"], max_len=16)
    clip = CLIPScorer(CLIP(CLIPConfig(vocab_size=len(tok.vocab), text_len=16, **TINY["clip"])), tok)
    cfg = GANConfig(text_dim=32, word_dim=clip.model.cfg.width, **{**TINY["gan"], **(model or {})})
    r = GANRecipe(cfg, clip, **recipe)
    return r, clip, load_data(spec, r, 0, 1)


def test_gan_step_trains_g_and_d_and_leaves_the_clip_frozen(shapes):
    import torch

    from pipelines.train import make_batch

    recipe, _, data = tiny_gan(shapes, 64, mode_seeking=1.0, vision_d=1.0, vision_width=8, d_hard_negatives=True)
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in recipe.modules.items()}
    logs = recipe.step(make_batch(data, 0, 32, 0), 0)
    changed = {n: any(not torch.equal(before[n][k], v) for k, v in m.state_dict().items())
               for n, m in recipe.modules.items()}
    assert changed == {"G": True, "D": True, "G_ema": True, "clip": False, "D_vision": True}
    assert logs["g_clip"] > 0 and logs["g_ms"] > 0 and set(logs) >= {"loss_d", "loss_g", "ma_gp", "d_vision", "g_vision"}
    # the vision D's state is its heads only: the tower it reads is saved (and stays frozen) with the CLIP
    assert not any(k.startswith("D_vision.tower") or ".conv." in k for k in recipe.state() if k.startswith("D_vision."))


def test_gan_fine_tuned_text_tower_trains_and_ships_its_average(shapes, tmp_path):
    """`text_lr`: G's own copy of CLIP's text tower learns through G's losses and its EMA is what the export
    embeds; the CLIP itself stays frozen. `recon` and `fc_hidden` run in the same step."""
    from models.checkpoint import load_checkpoint
    from pipelines.train import make_batch

    recipe, clip, data = tiny_gan(shapes, 64, {"fc_hidden": 16}, recon=10.0, text_lr=1e-3)
    frozen = {k: v.clone() for k, v in clip.model.text.state_dict().items()}
    logs = [recipe.step(make_batch(data, s, 32, 0), s) for s in range(3)]
    assert all(v.equal(clip.model.text.state_dict()[k]) for k, v in frozen.items())
    tuned, avg = recipe.text.state_dict(), recipe.text_ema.state_dict()
    assert any(not v.equal(tuned[k]) for k, v in frozen.items())  # G's losses reached the text tower
    assert any(not v.equal(avg[k]) for k, v in frozen.items()) and any(not v.equal(avg[k]) for k, v in tuned.items())
    assert all(log["g_recon"] > 0 for log in logs)
    recipe.export(str(tmp_path / "gan"))
    _, tensors = load_checkpoint(str(tmp_path / "gan"))
    assert all(tensors[f"text.{k}"].equal(v) for k, v in avg.items())
    assert load_generator(str(tmp_path / "gan")).generate(["a red circle"], [0]).shape == (1, 32, 32, 3)


def test_gan_recon_term_pulls_g_towards_the_captions_own_images(shapes):
    """pix2pix's L1 to the paired image: with only that term on, G's distance to its batch's images drops."""
    from pipelines.train import make_batch

    recipe, _, data = tiny_gan(shapes, 32, recon=1000.0, clip_weight=0.0, lr_g=2e-3)
    l1 = [recipe.step(make_batch(data, s, 32, 0), s)["g_recon"] for s in range(30)]
    assert sum(l1[-5:]) < 0.7 * sum(l1[:5])


def test_same_seed_same_training(ray_local, shapes, tmp_path):
    a = train("judge", shapes, tmp_path / "a", 10)
    b = train("judge", shapes, tmp_path / "b", 10)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]


def test_resuming_a_run_with_other_settings_is_refused(ray_local, shapes, tmp_path):
    train("judge", shapes, tmp_path, 10)
    with pytest.raises(ValueError, match="trained with other settings .*batch_size"):
        run_training(TrainSpec(kind="judge", data=shapes, out=str(tmp_path / "judge"), steps=20, batch_size=16,
                               threads=1, storage_path=str(tmp_path / "ray"), model=TINY["judge"]))


def test_clip_export_scores_prompts(ray_local, shapes, tmp_path):
    from models.clip import load_clip

    train("clip", shapes, tmp_path, 10)
    scorer = load_clip(str(tmp_path / "clip"))
    import numpy as np

    scores = scorer.score(np.zeros((2, 32, 32, 3), np.uint8), ["a red circle", "a photo of a dog"])
    assert scores.shape == (2,) and (scores >= 0).all() and (scores <= 100).all()


def test_cli_overrides_read_exponents_as_numbers():
    """YAML 1.1 reads `1e-4` as a string; the optimizer then failed at its first step, minutes into a run."""
    from jobs.train import _kv

    assert _kv(["text_lr=1e-4", "lr=2e-4", "steps=3", "text_in_fc=true", "columns=png", "x=0.5"]) == {
        "text_lr": 1e-4, "lr": 2e-4, "steps": 3, "text_in_fc": True, "columns": "png", "x": 0.5}
