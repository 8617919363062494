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
    "gan": {"text_dim": 32, "noise_dim": 16, "ngf": 8, "ndf": 8},
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
    s1 = train("gan", shapes, tmp_path, 10, name="gan-resume")
    s2 = train("gan", shapes, tmp_path, 20, name="gan-resume")  # same name: resumes at step 10
    assert [h["step"] for h in s2["history"]] == [5, 10, 15, 20]
    assert s2["history"][:2] == s1["history"]  # the first half is the resumed run's own history
    g = load_generator(str(tmp_path / "gan"), "cpu")
    assert g.generate(["a red circle"], [0], truncation=1.0).shape == (1, 32, 32, 3)
    hist = json.loads((tmp_path / "gan" / "training" / "history.json").read_text())
    assert hist["steps"] == 20


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
