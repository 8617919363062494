"""Per-image scores, rerank and job-level metrics, checked on real renders with the shipped CLIP and judge."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import save_tiny
from promptmill.models import load_generator
from promptmill.models.clip_loader import load_clip
from promptmill.models.judge import judge_prompts, load_judge
from promptmill.models.rerank import candidate_seed, generate_best_of
from promptmill.models.shapes.scenes import example
from promptmill.pipelines.runs.metrics import Evaluator, knn_precision_recall

CKPT = Path(__file__).resolve().parents[1] / "models" / "checkpoints"


@pytest.fixture(scope="module")
def renders() -> tuple[np.ndarray, list[str]]:
    ex = [example(i, 7, "test") for i in range(1200)]
    return np.stack([e[2] for e in ex]), [e[1] for e in ex]


@pytest.fixture(scope="module")
def clip():
    return load_clip(str(CKPT / "clip"))


@pytest.fixture(scope="module")
def judge():
    return load_judge(str(CKPT / "judge"))


def test_clip_score_prefers_the_true_caption(clip, renders):
    images, captions = renders[0][:400], renders[1][:400]
    shuffled = captions[1:] + captions[:1]
    true, wrong = clip.score(images, captions), clip.score(images, shuffled)
    assert true.min() >= 0 and true.max() <= 100
    assert true.mean() > wrong.mean() + 10, (true.mean(), wrong.mean())
    assert (true > wrong).mean() > 0.9


def test_clip_r_precision_on_the_test_split(clip, renders):
    """True caption among itself + 99 random ones: the number the model card reports."""
    from promptmill.pipelines.model_quality import r_precision

    assert r_precision(clip, renders[0][:300], renders[1][:300], distractors=99, seed=0) > 0.5


def test_clip_knows_which_of_two_objects_has_which_attribute(clip, renders):
    """The shipped CLIP scores a render's own caption above the caption with a colour, shape or size swapped
    between its two objects; the GAN reads its caption through this CLIP and is guided by it."""
    from promptmill.pipelines.model_quality import TestSplit, clip_binding

    split = TestSplit(torch.from_numpy(renders[0]).permute(0, 3, 1, 2).contiguous(), renders[1], [], [])
    binding = clip_binding(clip, split, len(renders[1]))
    assert set(binding) == {"color", "shape", "size"}
    assert min(binding.values()) > 0.8, binding  # 0.5 is chance; shipped: 0.89 colour, 0.90 shape, 1.00 size


def test_prompt_match_is_one_on_real_renders_and_none_out_of_domain(judge, renders):
    images = torch.from_numpy(renders[0][:300]).permute(0, 3, 1, 2).contiguous()
    # the judge, its near-miss head and the geometry all pass real renders (two touching objects of one colour
    # can read as one blob: about 1 in 1,000)
    assert np.mean([v.match for v in judge_prompts(judge, images, renders[1][:300])]) >= 0.99
    ok = [v.match for v in judge_prompts(judge, images[:2], ["a photo of a dog", renders[1][1]])]
    assert ok == [None, True]  # out of the grammar: no verdict; its own caption: a match
    import random

    from promptmill.models.shapes.scenes import hard_negative

    wrong = [(i, hard_negative(renders[1][i], random.Random(i))) for i in range(40)]
    wrong = [(i, w) for i, w in wrong if w][:20]
    verdicts = judge_prompts(judge, images[[i for i, _ in wrong]], [w for _, w in wrong])
    assert np.mean([v.match is False for v in verdicts]) >= 0.9  # one attribute changed: not a match


def test_rerank_keeps_the_highest_scoring_candidate(clip, tmp_path):
    gen = load_generator(save_tiny(str(tmp_path / "gan"), "gan"), "cpu")
    prompts = ["a small red circle on the left", "a large blue square above a green triangle"]
    seeds = [11, 12]
    best = generate_best_of(gen, clip, prompts, seeds, 6)
    for i, p in enumerate(prompts):
        cands = gen.generate([p] * 6, [candidate_seed(seeds[i], k) for k in range(6)])
        scores = clip.score(cands, [p] * 6)
        assert best.index[i] == int(np.argmax(scores))
        np.testing.assert_array_equal(best.images[i], cands[best.index[i]])
        assert best.score[i] == pytest.approx(scores.max(), abs=1e-3)
    # K = 1 is the plain sample; candidate 0 always uses the image's own seed
    one = generate_best_of(gen, clip, prompts, seeds, 1)
    np.testing.assert_array_equal(one.images, gen.generate(prompts, seeds))


# ---------------------------------------------------------------- the metrics, validated as in the FID paper

@pytest.fixture(scope="module")
def evaluator(judge, renders):
    return Evaluator(judge, renders[0][:600])


def _noise(x: np.ndarray, sigma: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(x + rng.normal(0, sigma, x.shape), 0, 255).astype(np.uint8)


def _blur(x: np.ndarray, k: int) -> np.ndarray:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float()
    t = torch.nn.functional.avg_pool2d(t, k, stride=1, padding=k // 2, count_include_pad=False)[..., :32, :32]
    return t.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_fid_of_real_vs_real_is_the_floor_and_grows_with_noise(evaluator, renders):
    real2 = renders[0][600:1200]
    floor = evaluator(real2)
    fids = [evaluator(_noise(real2, s))["fid"] for s in (8, 24, 64)]
    assert floor["fid"] < fids[0] < fids[1] < fids[2], (floor["fid"], fids)
    assert floor["precision"] > 0.8 and floor["recall"] > 0.8


def test_fid_grows_with_blur(evaluator, renders):
    real2 = renders[0][600:1200]
    fids = [evaluator(real2)["fid"]] + [evaluator(_blur(real2, k))["fid"] for k in (3, 5, 7)]
    assert fids == sorted(fids) and fids[0] < fids[-1], fids


def test_inception_score_of_renders_beats_noise(evaluator, renders):
    real = evaluator(renders[0][600:1200])["inception_score"]
    noise = evaluator(np.random.default_rng(1).integers(0, 256, (600, 32, 32, 3), dtype=np.uint8))["inception_score"]
    assert real > 2 * noise, (real, noise)


def test_knn_precision_recall_on_known_sets():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 8, generator=g)
    assert knn_precision_recall(real, torch.randn(400, 8, generator=g)) > (0.8, 0.8)
    far = torch.randn(400, 8, generator=g) + 20
    assert knn_precision_recall(real, far) == (0.0, 0.0)
    collapsed = real[:1].repeat(400, 1) + 1e-3 * torch.randn(400, 8, generator=g)  # mode collapse: precise, no recall
    p, r = knn_precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.1


def test_seeds_of_candidates_are_stable():
    assert candidate_seed(5, 0) == 5
    assert candidate_seed(5, 1) == candidate_seed(5, 1) != candidate_seed(5, 2)
