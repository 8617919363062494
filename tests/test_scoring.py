"""Per-image scores, rerank and job-level metrics, checked on real renders with the shipped CLIP and judge."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import save_tiny, write_prompts
from promptmill.models import load_generator
from promptmill.models.clip_loader import load_clip
from promptmill.models.generator import resolved_sampling
from promptmill.models.images import decode_image, to_nchw
from promptmill.models.judge import judge_prompts, load_judge
from promptmill.models.rerank import CHOOSERS, Scorers, candidate_seed, choose, generate_best_of
from promptmill.models.shapes.scenes import example
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.batch.preflight import fingerprint
from promptmill.pipelines.runs.metrics import Evaluator, knn_precision_recall
from promptmill.pipelines.runs.results import score_summary
from promptmill.pipelines.spec import SpecError, load_spec

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
    by_clip = CHOOSERS["clip_score"](Scorers(clip))
    best = generate_best_of(gen, by_clip, prompts, seeds, 6)
    for i, p in enumerate(prompts):
        cands = gen.generate([p] * 6, [candidate_seed(seeds[i], k) for k in range(6)])
        scores = clip.score(cands, [p] * 6)
        assert best.index[i] == int(np.argmax(scores))
        np.testing.assert_array_equal(best.images[i], cands[best.index[i]])
        assert best.score[i] == pytest.approx(scores.max(), abs=1e-3)
    # K = 1 is the plain sample; candidate 0 always uses the image's own seed
    one = generate_best_of(gen, by_clip, prompts, seeds, 1)
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


def test_choose_breaks_ties_by_the_second_score_of_the_tied_candidates_only():
    scores = np.array([[0.0, 1.0, 1.0, 0.5],   # a tie at the top: the second score decides between k = 1 and 2
                       [2.0, 1.0, 1.0, 0.0],   # no tie at the top: ties below it do not matter
                       [1.0, 1.0, 1.0, 1.0]])  # the second score ties too (k = 1, 3): the earlier draw
    second = np.array([[9.0, 3.0, 5.0, 9.0], [9.0, 9.0, 9.0, 9.0], [0.0, 4.0, 1.0, 4.0]]).ravel()
    asked = []

    def tie_break(flat: np.ndarray) -> np.ndarray:
        asked.append(flat.tolist())
        return second[flat]

    assert choose(scores, tie_break).tolist() == [2, 0, 1]
    assert asked == [[1, 2, 8, 9, 10, 11]]  # row-major flat indices of the tied candidates, and nothing else
    assert choose(scores).tolist() == [1, 0, 0]  # no second score: the earliest of the tied


def test_seeds_of_candidates_are_stable():
    assert candidate_seed(5, 0) == 5
    assert candidate_seed(5, 1) == candidate_seed(5, 1) != candidate_seed(5, 2)


# ---------------------------------------------------------------- best-of-K in the job: two families, two choosers

RERANK_PROMPTS = ["a small red circle on the left", "a large blue square above a green triangle",
                  "big yellow triangle, top", "a purple diamond in the center", "a huge orange square on the right",
                  "a small white circle below a red diamond", "a photo of a dog on a beach"]
MATCH_RANK = {True: 1, False: 0, None: -1}  # a match, none, a prompt outside the shapes grammar


def _rerank_spec(inp: str, out: str, **over) -> dict:
    return {"name": "rerank", "seed": 5, "input": {"path": inp, "id_column": "id", **over},
            "models": [{"name": "dalle", "family": "transformer", "checkpoint": "shipped:dalle", "images_per_prompt": 1,
                        # temperature 1 over the checkpoint's 0.7: a Transformer that misses often enough to rerank
                        "sampling": {"temperature": 1.0, "top_k": 64, "candidates": 4, "rerank_by": "prompt_match"},
                        "resources": {"batch_size": 4, "threads": 1}},
                       {"name": "gan", "family": "gan", "checkpoint": "shipped:gan", "images_per_prompt": 2,
                        "sampling": {"candidates": 3, "rerank_by": "clip_score"},
                        "resources": {"batch_size": 4, "threads": 1}}],
            "output": {"path": out}}


@pytest.fixture
def one_thread():
    """Torch on one thread while a test draws beside a job's actors: a team of two stalls on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "images").rglob("*.png"))}


def test_best_of_k_by_prompt_match_and_clip_score_in_a_job_resumes_to_the_same_bytes(ray_local, clip, judge, tmp_path,
                                                                                     one_thread):
    inp = write_prompts(tmp_path / "in.parquet", RERANK_PROMPTS, [f"p{i}" for i in range(len(RERANK_PROMPTS))])
    out = tmp_path / "out"
    # 1. the first four prompts, then all of them into the same output: the second run draws only the rest
    first = run_job(load_spec(_rerank_spec(inp, str(out), limit=4)))
    assert first.images_written == {"dalle": 4, "gan": 8}
    before = _files(out)
    second = run_job(load_spec(_rerank_spec(inp, str(out))))
    assert second.images_written == {"dalle": 3, "gan": 6}
    after = _files(out)
    assert {k: after[k] for k in before} == before  # the first run's images untouched
    rows = pq.read_table(out / "metadata").to_pylist()
    assert len(rows) == 7 + 14

    # 2. every kept image is the chooser's best of its K candidates, drawn and scored here independently
    spec = load_spec(_rerank_spec(inp, str(out)))
    models = {m.name: m for m in spec.models}
    gens = {name: load_generator(m.checkpoint, "cpu") for name, m in models.items()}
    moved, told_apart = 0, {"dalle": 0, "gan": 0}
    for r in rows:
        m, gen = models[r["model"]], gens[r["model"]]
        k = m.candidates
        assert (r["candidates"], r["rerank_by"]) == ((4, "prompt_match") if r["model"] == "dalle" else (3, "clip_score"))
        cands = gen.generate([r["prompt"]] * k, [candidate_seed(r["seed"], j) for j in range(k)],
                             **resolved_sampling(gen, m.family_sampling).model_dump())  # the checkpoint's too
        sims = clip.similarity(cands, [r["prompt"]] * k)
        match = [MATCH_RANK[v.match] for v in judge_prompts(judge, to_nchw(cands), [r["prompt"]] * k)]
        by_match, by_clip = [(match[j], sims[j], -j) for j in range(k)], [(sims[j], match[j], -j) for j in range(k)]
        keys, other = (by_match, by_clip) if r["rerank_by"] == "prompt_match" else (by_clip, by_match)
        best = keys.index(max(keys))  # the best score, then the other score, then the earliest draw
        told_apart[r["model"]] += best != other.index(max(other))
        assert r["candidate_index"] == best, (r["prompt"], r["model"], match, sims)
        kept = decode_image((out / r["image_path"]).read_bytes()).astype(int)
        assert np.abs(kept - cands[best].astype(int)).max() <= 1  # the batch moves a pixel by one level at most
        moved += best != 0
        if r["rerank_by"] == "prompt_match":  # the kept image matches whenever one of its candidates does
            assert r["candidate_score"] == (None if match[best] < 0 else float(match[best]))
            assert r["prompt_match"] == (None if max(match) < 0 else max(match) == 1)
        else:
            assert r["candidate_score"] == pytest.approx(max(float(sims[best]), 0), abs=1e-3)
    assert moved > 0  # rerank kept another candidate than the plain sample somewhere
    assert told_apart["dalle"] and told_apart["gan"]  # each model has rows the other chooser would have drawn otherwise

    # 3. what the run says about it: summary and report
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scores"]["dalle"]["rerank"] == "best of 4 by prompt_match"
    assert summary["scores"]["gan"]["rerank"] == "best of 3 by clip_score"
    html = (out / "report.html").read_text()
    assert "best of 4 by prompt_match" in html and "best of 3 by clip_score" in html
    assert re.search(r"kept #[0-3] of 4 by prompt_match", html) and re.search(r"kept #[0-2] of 3 by clip_score", html)

    # 4. a rerun draws nothing and leaves every byte as it was
    third = run_job(load_spec(_rerank_spec(inp, str(out))))
    assert not any(third.images_written.values())
    assert _files(out) == after
    assert pq.read_table(out / "metadata").to_pylist() == rows


def test_rerank_by_is_checked_against_the_family_and_the_scorers(checkpoints, tmp_path):
    base = _rerank_spec(str(tmp_path / "in.parquet"), str(tmp_path / "out"))

    def spec_with(model: int, sampling: dict, **over) -> dict:
        s = json.loads(json.dumps(base))
        s["models"][model]["sampling"] = sampling
        return {**s, **over}

    sd = {"name": "sd", "family": "diffusers", "checkpoint": str(tmp_path / "sd"),
          "sampling": {"candidates": 2, "rerank_by": "prompt_match"}}
    cases = [({**base, "models": [sd]}, r"model 'sd': sampling.rerank_by 'prompt_match' .*meaningless for family "
                                         r"'diffusers'"),
             (spec_with(1, {"candidates": 2, "rerank_by": "sharpness"}),
              r"model 'gan': sampling.rerank_by 'sharpness' is not a score .*'clip_score', 'prompt_match', "
              r"'aesthetic_score'"),
             (spec_with(0, {"candidates": 2, "rerank_by": "prompt_match"}, scoring={"judge": None}),
              r"model 'dalle': sampling.rerank_by 'prompt_match' needs scoring.judge"),
             (spec_with(1, {"candidates": 2, "rerank_by": "aesthetic_score"}),
              r"model 'gan': sampling.rerank_by 'aesthetic_score' needs scoring.aesthetic")]
    for data, message in cases:
        with pytest.raises(SpecError, match=message):
            load_spec(data)
    # at K = 1 nothing is chosen: rerank_by neither records nor guards anything
    one = load_spec(spec_with(0, {"rerank_by": "prompt_match"}, scoring={"judge": None})).models[0]
    assert one.rerank_by is None and one.family_sampling == {}
    # the default chooser spelled out is the output an older run wrote without it; another chooser is not
    prints = [fingerprint(load_spec(spec_with(1, s)))["models"]["gan"]["sampling"]
              for s in ({"candidates": 3}, {"candidates": 3, "rerank_by": "clip_score"},
                        {"candidates": 3, "rerank_by": "prompt_match"})]
    assert prints[0] == prints[1] != prints[2]


def test_rows_written_before_the_chooser_was_recorded_read_as_clip_score():
    old = pa.table({"model": ["m", "m", "k"], "id": ["a", "b", "a"], "sample": [0, 0, 0], "clip_score": [1.0, 2.0, 3.0],
                    "prompt_match": [None, None, None], "candidates": [4, 4, 1], "diversity": [None] * 3,
                    "near_duplicate": [None] * 3})
    scores = score_summary(old)
    assert scores["m"]["rerank"] == "best of 4 by clip_score" and scores["k"]["rerank"] is None
