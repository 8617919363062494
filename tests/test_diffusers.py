"""The diffusers family on tiny random pipelines built here (diffusers' own test recipe): Stable Diffusion and
aMUSEd directories, saved locally and to moto S3, through the full generate job. Needs the optional extra."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_spec, write_prompts

diffusers = pytest.importorskip("diffusers", reason="pip install 'promptmill[diffusers]'")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402
from promptmill.jobs.cli import main  # noqa: E402
from promptmill.models.images import decode_image  # noqa: E402
from promptmill.pipelines.batch.job import run_job  # noqa: E402
from promptmill.pipelines.spec import load_spec  # noqa: E402
from tiny_hf import tiny_amused, tiny_hf_clip, tiny_sd  # noqa: E402


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"sd": str(tiny_sd(root / "sd")), "amused": str(tiny_amused(root / "amused"))}


SIZES = {"sd": {"height": 32, "width": 32, "num_inference_steps": 2},
         "amused": {"height": 8, "width": 8, "num_inference_steps": 2}}


def _spec(tmp_path, pipe_dir: str, kind: str, out: str, batch: int = 4) -> dict:
    spec = make_spec(str(tmp_path / "in"), out, {"gan": ""}, scoring={"enabled": False})
    spec["models"] = [{"name": kind, "family": "diffusers", "checkpoint": pipe_dir, "images_per_prompt": 2,
                       "sampling": SIZES[kind], "resources": {"batch_size": batch}}]
    return spec


@pytest.mark.parametrize("kind", ["sd", pytest.param("amused", marks=pytest.mark.slow)])  # amused: make chaos
def test_a_diffusers_pipeline_runs_through_the_job_exactly_once_and_batch_invariantly(
        ray_local, pipelines, tmp_path, kind):
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", "a blue square on the left", "a photo of a cat"],
                  ["a", "b", "c"])
    res = run_job(load_spec(_spec(tmp_path, pipelines[kind], kind, str(tmp_path / "out"))))
    assert res.images_total == {kind: 6}
    rows = {(r["id"], r["sample"]): r for r in pq.read_table(tmp_path / "out" / "metadata").to_pylist()}
    size = SIZES[kind]["height"]
    expect_class = "StableDiffusionPipeline" if kind == "sd" else "AmusedPipeline"
    assert {r["family"] for r in rows.values()} == {"diffusers"}
    assert {r["pipeline_class"] for r in rows.values()} == {expect_class}
    assert {(r["width"], r["height"]) for r in rows.values()} == {(size, size)}
    images = {k: decode_image((tmp_path / "out" / r["image_path"]).read_bytes()) for k, r in rows.items()}
    assert all(im.shape == (size, size, 3) for im in images.values())
    assert run_job(load_spec(_spec(tmp_path, pipelines[kind], kind, str(tmp_path / "out")))).skipped  # exactly once
    # batch size 1 on a fresh output: the same draws (one generator per image). A batched UNet is not bit-identical
    # to one image at a time, so pixels agree to float rounding, not bit for bit (our own families: bit for bit)
    run_job(load_spec(_spec(tmp_path, pipelines[kind], kind, str(tmp_path / "out1"), batch=1)))
    rows1 = {(r["id"], r["sample"]): r for r in pq.read_table(tmp_path / "out1" / "metadata").to_pylist()}
    for k, r in rows1.items():
        one = decode_image((tmp_path / "out1" / r["image_path"]).read_bytes()).astype(int)
        assert np.abs(one - images[k]).max() <= 2, (k, np.abs(one - images[k]).max())
    other_seed = images[("a", 1)].astype(int) - images[("a", 0)]
    assert np.abs(other_seed).max() > 20  # while another seed is another image


def test_a_pipeline_on_s3_is_cached_once_and_bad_input_exits_2(ray_local, pipelines, s3, tmp_path, capsys, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.put(pipelines["sd"] + "/", "bucket/models/sd/", recursive=True)
    monkeypatch.setenv("PROMPTMILL_CACHE", str(tmp_path / "cache"))
    from promptmill.models.hf_diffusers import local_copy

    first = local_copy("s3://bucket/models/sd", s3)
    assert Path(first, "model_index.json").exists() and local_copy("s3://bucket/models/sd", s3) == first
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle"], ["a"])
    spec = _spec(tmp_path, "s3://bucket/models/sd", "sd", str(tmp_path / "out"))
    spec["models"][0]["storage_options"] = s3
    assert run_job(load_spec(spec)).images_total == {"sd": 2}
    # bad sampling: exit 2 naming the field; a directory that is not a pipeline: exit 2 naming it
    spec["models"][0]["sampling"] = {**SIZES["sd"], "num_inference_stepz": 3}
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "output": {"path": str(tmp_path / "o2")}}))
    assert main(["generate", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert "models[0] (sd).sampling" in err and "num_inference_stepz" in err, err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    spec = _spec(tmp_path, str(broken), "sd", str(tmp_path / "o3"))
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(spec))
    assert main(["generate", str(tmp_path / "broken.yaml")]) == 2
    assert "model_index.json is not valid" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    from promptmill.models.hf_diffusers import DiffusersGenerator

    gen = DiffusersGenerator.load(pipelines["sd"], torch.device("cpu"))
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by the loader: never a hub download at run time
    assert gen.generate(["a red circle"], [7], **SIZES["sd"]).shape == (1, 32, 32, 3)


class TensorFeatures(torch.nn.Module):
    """torchmetrics 1.9 expects get_*_features to return tensors, as transformers < 5 did; transformers 5 returns
    an output whose pooler_output is that tensor. The adapter only bridges the return type."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args, **kwargs):
        return self.model.get_image_features(*args, **kwargs).pooler_output

    def get_text_features(self, *args, **kwargs):
        return self.model.get_text_features(*args, **kwargs).pooler_output


def test_a_hugging_face_clip_scores_as_torchmetrics_does_and_through_the_job(ray_local, pipelines, tmp_path):
    from promptmill.models.clip_loader import load_clip
    from torchmetrics.multimodal.clip_score import CLIPScore

    clip_dir = str(tiny_hf_clip(tmp_path / "clip"))
    scorer = load_clip(clip_dir)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    prompts = ["a red circle", "a blue square", "a photo of a cat", "the dog on the left"]
    ours = scorer.score(images, prompts)
    reference = []
    for im, p in zip(images, prompts):  # torchmetrics' own metric on the same model and processor, one pair at a time
        metric = CLIPScore(model_name_or_path=lambda: (TensorFeatures(scorer.model), scorer.processor))
        metric.update(torch.from_numpy(im).permute(2, 0, 1), p)
        reference.append(metric.compute().item())
    assert np.allclose(ours, reference, atol=1e-4), (ours, reference)
    assert ours.min() > 5 and ours.max() - ours.min() > 0.5, ours  # real scores, not the clamp's 0 in every row
    # end to end, reranked: a diffusers model draws 3 candidates per image, the HF CLIP keeps the best; clip_score
    # in every row, report written
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", "a photo of a cat", "the dog on the left"],
                  ["a", "b", "c"])
    spec = _spec(tmp_path, pipelines["sd"], "sd", str(tmp_path / "out"))
    spec["models"][0]["sampling"] = {**SIZES["sd"], "candidates": 3}
    spec["scoring"] = {"clip": clip_dir, "judge": None}
    run_job(load_spec(spec))
    rows = pq.read_table(tmp_path / "out" / "metadata").to_pylist()
    assert len(rows) == 6 and all(r["clip_score"] is not None and 0 < r["clip_score"] <= 100 for r in rows)
    assert len({round(r["clip_score"], 3) for r in rows}) > 1
    assert all(r["prompt_match"] is None for r in rows) and (tmp_path / "out" / "report.html").exists()
    # the same draws made here, one image at a time, outside the job: the kept one is their best by clip_score
    from promptmill.models.hf_diffusers import DiffusersGenerator
    from promptmill.models.rerank import candidate_seed

    gen = DiffusersGenerator.load(pipelines["sd"], torch.device("cpu"))
    for r in rows:
        draws = np.concatenate([gen.generate([r["prompt"]], [candidate_seed(r["seed"], k)], **SIZES["sd"])
                                for k in range(3)])
        sims = scorer.similarity(draws, [r["prompt"]] * 3)  # rerank's order: raw 100 cos
        k = r["candidate_index"]  # the best, up to batched-vs-single rounding (pixels differ by <= 2/255)
        assert r["candidates"] == 3 and sims[k] >= sims.max() - 0.5, (k, sims)
        assert abs(r["clip_score"] - max(sims[k], 0)) < 0.5
        kept = decode_image((tmp_path / "out" / r["image_path"]).read_bytes()).astype(int)
        assert np.abs(kept - draws[k]).max() <= 2, (r, sims)
    assert any(r["candidate_index"] != 0 for r in rows)  # rerank changed something: not always the plain sample


def test_stage_model_copies_checks_and_loads_from_storage(pipelines, s3, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setenv("PROMPTMILL_CACHE", str(tmp_path / "cache"))
    import json

    opts = [f"--storage-option={k}={v}" for k, v in s3.items()]  # the old spelling, kept for a release
    assert main(["stage-model", pipelines["sd"], "s3://bucket/staged/sd", "--storage-options", json.dumps(s3),
                 "--load"]) == 0
    out = capsys.readouterr().out
    assert "diffusers) -> s3://bucket/staged/sd; loads from there" in out and out.startswith("staged 10 files")
    broken = tmp_path / "broken"
    shutil.copytree(pipelines["sd"], broken)
    shutil.rmtree(broken / "unet")  # model_index.json still names it
    assert main(["stage-model", str(broken), "s3://bucket/staged/broken", *opts]) == 2
    assert "names components with no folder: ['unet']" in capsys.readouterr().err


def test_an_unfinished_cache_entry_is_replaced(pipelines, s3, tmp_path, monkeypatch):
    import s3fs
    from promptmill.models.hf_diffusers import INDEX
    from promptmill.models.local_cache import cache_dir, local_copy

    monkeypatch.setenv("PROMPTMILL_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem(**s3).put(pipelines["amused"] + "/", "bucket/models/amused/", recursive=True)
    first = Path(local_copy("s3://bucket/models/amused", s3))
    (first / ".promptmill-complete").unlink()  # as a crashed copy (or an older version's) would leave it
    (first / INDEX).unlink()
    assert Path(local_copy("s3://bucket/models/amused", s3)) == first and (first / INDEX).exists()
    assert first.parent == cache_dir()


def test_models_of_three_sizes_beside_the_shipped_gan_score_report_and_resume_on_s3(ray_local, pipelines, s3, tmp_path,
                                                                                      monkeypatch):
    """A user's first real job: pipelines drawing 48 and 64 px beside our 32 px GAN, scoring and the report on,
    prompts and output on S3, WebDataset shards, then a rerun with new prompts. Every image is scored, the
    report shows every model, and a report that fails costs nothing committed."""
    import io

    import pyarrow as pa
    import s3fs
    from promptmill.pipelines.runs import report as report_module

    fs = s3fs.S3FileSystem(**s3)
    fs.put(pipelines["sd"] + "/", "bucket/mixed/models/sd/", recursive=True)
    monkeypatch.setenv("PROMPTMILL_CACHE", str(tmp_path / "cache"))

    def prompts(name: str, ids: list[str], texts: list[str]) -> None:
        buf = io.BytesIO()
        pq.write_table(pa.table({"id": ids, "prompt": texts}), buf)
        fs.pipe(f"bucket/mixed/prompts/{name}.parquet", buf.getvalue())

    prompts("a", ["a", "b", "c"], ["a small red circle on the left", "a large blue square", "a photo of a cat"])
    spec = make_spec("s3://bucket/mixed/prompts/", "s3://bucket/mixed/out", {"gan": "shipped:gan"})
    spec["input"]["storage_options"] = s3
    spec["output"].update(storage_options=s3, format="webdataset")
    sd = {"family": "diffusers", "checkpoint": "s3://bucket/mixed/models/sd", "storage_options": s3,
          "images_per_prompt": 2, "resources": {"batch_size": 4}}
    spec["models"] += [{**sd, "name": "sd48", "sampling": {"height": 48, "width": 48, "num_inference_steps": 2}},
                       {**sd, "name": "sd64", "sampling": {"height": 64, "width": 64, "num_inference_steps": 2}}]
    res = run_job(load_spec(spec))
    assert res.images_total == {"gan": 6, "sd48": 6, "sd64": 6}
    out = "bucket/mixed/out"

    def committed() -> list[dict]:
        fs.invalidate_cache()
        return pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(f))) for f in fs.find(f"{out}/metadata")],
                                promote_options="permissive").to_pylist()

    rows = committed()
    assert {(r["model"], r["width"], r["height"]) for r in rows} == {("gan", 32, 32), ("sd48", 48, 48), ("sd64", 64, 64)}
    assert all(r["scoring_error"] is None and r["clip_score"] is not None and r["judged"] is not None for r in rows)
    assert len({round(r["clip_score"], 3) for r in rows}) > 3  # scored, not one default value
    summary = json.loads(fs.cat_file(f"{out}/summary.json"))
    assert "report_error" not in summary and fs.exists(f"{out}/_SUCCESS")
    page = fs.cat_file(f"{out}/report.html").decode()
    for m in ("gan", "sd48", "sd64"):
        assert f"alt='{m}'" in page  # side by side: every model's thumbnail
    assert "width=96 height=96" in page  # the 32, 48 and 64 px images upscaled by whole factors (3x, 2x)

    # a report that fails (here: forced) never blocks the committed run; `promptmill report` rebuilds it
    def broken(_run, **_options):  # build_report's options (review_url) too
        raise RuntimeError("report broke")

    monkeypatch.setattr(report_module, "build_report", broken)
    prompts("b", ["d"], ["a green triangle"])
    res = run_job(load_spec(spec))
    assert res.images_total == {"gan": 8, "sd48": 8, "sd64": 8} and res.images_written == {"gan": 2, "sd48": 2, "sd64": 2}
    summary = json.loads(fs.cat_file(f"{out}/summary.json"))
    assert summary["report_error"] == "RuntimeError: report broke" and fs.exists(f"{out}/_SUCCESS")
    assert len(committed()) == 24 and all(r["clip_score"] is not None for r in committed())
    monkeypatch.undo()
    opts = json.dumps(s3)
    assert main(["report", "s3://bucket/mixed/out", "--storage-options", opts]) == 0
    assert "report_error" not in json.loads(fs.cat_file(f"{out}/summary.json"))
    assert "alt='sd64'" in fs.cat_file(f"{out}/report.html").decode()


def test_non_finite_and_flagged_images_never_land_as_good_ones(ray_local, tmp_path):
    """A VAE that returns NaN: every row is rejected as non_finite_output (and counts against max_error_fraction);
    a safety checker that flags everything: rows rejected as nsfw by default, kept with nsfw = true under
    output.nsfw: flag; a pipeline without a checker leaves the column null. Summary and report count them."""
    from promptmill.pipelines.batch.job import JobFailed
    from tiny_hf import tiny_sd_nan_vae, tiny_sd_with_checker

    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", "a blue square", "a photo of a cat"], ["a", "b", "c"])
    nan, flagged = str(tiny_sd_nan_vae(tmp_path / "nan")), str(tiny_sd_with_checker(tmp_path / "flagged"))
    clean = str(tiny_sd_with_checker(tmp_path / "clean", flag_everything=False))

    spec = _spec(tmp_path, nan, "sd", str(tmp_path / "o-nan"))
    spec["output"]["max_error_fraction"] = 1.0
    res = run_job(load_spec(spec))
    assert res.images_total == {} or res.images_total == {"sd": 0}
    assert res.rejected == {"non_finite_output": 6}
    rejected = pq.read_table(tmp_path / "o-nan" / "rejected").to_pylist()
    assert {r["reason"] for r in rejected} == {"non_finite_output"} and "fp16 VAE overflow" in rejected[0]["error"]
    spec["output"].update(path=str(tmp_path / "o-nan2"), max_error_fraction=0.5)
    with pytest.raises(JobFailed, match="6 of 6 images failed"):
        run_job(load_spec(spec))

    spec = _spec(tmp_path, flagged, "sd", str(tmp_path / "o-reject"))
    res = run_job(load_spec(spec))
    assert res.rejected == {"nsfw": 6} and res.images_written == {"sd": 0}
    spec["output"].update(path=str(tmp_path / "o-flag"), nsfw="flag", report=True)
    res = run_job(load_spec(spec))
    rows = pq.read_table(tmp_path / "o-flag" / "metadata").to_pylist()
    assert len(rows) == 6 and all(r["nsfw"] is True for r in rows)
    assert all(decode_image((tmp_path / "o-flag" / r["image_path"]).read_bytes()).max() == 0
               for r in rows)  # the checker's black
    assert json.loads((tmp_path / "o-flag" / "summary.json").read_text())["scores"]["sd"]["nsfw_images"] == 6

    # what the job reads per image (the flag job above shows it reaching metadata): a checker that passed an image
    # says false, a pipeline without one cannot tell (null, and the summary's count is null, not zero)
    from promptmill.models.hf_diffusers import DiffusersGenerator
    from promptmill.pipelines.layout import METADATA_SCHEMA
    from promptmill.pipelines.metadata import SUMMARY_COLUMNS
    from promptmill.pipelines.runs.results import score_summary

    for where, expect in ((clean, [False, False]), (str(tmp_path / "flagged-base"), [None, None])):
        gen = DiffusersGenerator.load(where, torch.device("cpu"))
        gen.generate(["a red circle", "a blue square"], [1, 2], **SIZES["sd"])
        assert gen.last_info["nsfw"] == expect
    schema = pa.schema([METADATA_SCHEMA.field(c) for c in SUMMARY_COLUMNS])
    unknown = pa.Table.from_pylist([{"model": "sd", "id": i, "sample": 0} for i in "ab"], schema=schema)
    assert score_summary(unknown)["sd"]["nsfw_images"] is None


def test_prompts_over_the_token_limit_are_flagged_or_rejected_and_noise_comes_from_the_cpu(ray_local, pipelines,
                                                                                            tmp_path):
    """The tiny pipeline's tokenizer takes 16 tokens: a longer prompt is drawn cut and flagged prompt_truncated
    (input.truncate: true, the default), or rejected as prompt_too_many_tokens (false)."""
    from promptmill.models.hf_diffusers import DiffusersGenerator

    long = "a red circle on the left " * 6  # 30 words: over 16 tokens
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", long], ["short", "long"])
    spec = _spec(tmp_path, pipelines["sd"], "sd", str(tmp_path / "out"))
    res = run_job(load_spec(spec))
    rows = {(r["id"], r["sample"]): r for r in pq.read_table(tmp_path / "out" / "metadata").to_pylist()}
    assert res.images_total == {"sd": 4}
    assert rows[("long", 0)]["prompt_truncated"] is True and rows[("short", 0)]["prompt_truncated"] is False
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["scores"]["sd"]["prompt_truncated_images"] == 2
    spec = _spec(tmp_path, pipelines["sd"], "sd", str(tmp_path / "strict"))
    spec["input"]["truncate"] = False
    res = run_job(load_spec(spec))
    assert res.rejected == {"prompt_too_many_tokens": 2} and res.images_total == {"sd": 2}
    rejected = pq.read_table(tmp_path / "strict" / "rejected").to_pylist()
    assert all(r["id"] == "long" and "the text encoder takes 16" in r["error"] for r in rejected)
    # the initial noise is drawn by CPU generators: what a GPU resume draws too (same seeds, same latents)
    gen = DiffusersGenerator.load(pipelines["sd"], torch.device("cpu"))
    seen = []

    class Recorded:  # the real pipeline, with the generators it is handed written down
        def __init__(self, pipe) -> None:
            self.pipe = pipe

        def __call__(self, *args, **kwargs):
            gens = kwargs["generator"]
            seen.extend(g.device.type for g in (gens if isinstance(gens, list) else [gens]))
            return self.pipe(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.pipe, name)

    gen.pipe = Recorded(gen.pipe)
    gen.generate(["a red circle", "a blue square"], [1, 2], **SIZES["sd"])
    assert seen == ["cpu", "cpu"]


def test_precision_sets_the_weights_dtype_and_bf16_runs_on_cpu(pipelines):
    from promptmill.models.checkpoint import CheckpointError
    from promptmill.models.hf_diffusers import DiffusersGenerator

    fp32 = DiffusersGenerator.load(pipelines["sd"], torch.device("cpu"))
    bf16 = DiffusersGenerator.load(pipelines["sd"], torch.device("cpu"), precision="bf16")
    assert fp32.pipe.unet.dtype == torch.float32 and bf16.pipe.unet.dtype == torch.bfloat16
    a, b = (g.generate(["a red circle"], [3], **SIZES["sd"]) for g in (fp32, bf16))
    assert a.shape == b.shape == (1, 32, 32, 3) and 0 < np.abs(a.astype(int) - b).mean() < 40  # close, not equal
    with pytest.raises(CheckpointError, match="fp16 runs on CUDA only"):
        DiffusersGenerator.load(pipelines["sd"], torch.device("cpu"), precision="fp16")
    with pytest.raises(CheckpointError, match="variant 'fp16'"):
        DiffusersGenerator.load(pipelines["sd"], torch.device("cpu"), variant="fp16")  # no such files here


def test_a_scheduler_by_name_changes_the_draws_and_an_unknown_one_names_the_field(ray_local, pipelines, tmp_path,
                                                                                  capsys):
    from promptmill.models.hf_diffusers import DiffusersGenerator

    gen = DiffusersGenerator.load(pipelines["sd"], torch.device("cpu"))
    ddim = gen.generate(["a red circle"], [5], **SIZES["sd"])
    heun = gen.generate(["a red circle"], [5], **SIZES["sd"], scheduler="HeunDiscreteScheduler")
    assert type(gen.pipe.scheduler).__name__ == "HeunDiscreteScheduler"
    assert np.abs(ddim.astype(int) - heun).max() > 10  # another sampler, other pixels
    again = gen.generate(["a red circle"], [5], **SIZES["sd"], scheduler="DDIMScheduler")
    assert np.abs(again.astype(int) - ddim).max() <= 2  # back to the pipeline's own config
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle"], ["a"])
    spec = _spec(tmp_path, pipelines["sd"], "sd", str(tmp_path / "out"))
    spec["models"][0]["sampling"] = {**SIZES["sd"], "scheduler": "NoSuchScheduler"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["generate", str(tmp_path / "s.yaml")]) == 2
    err = capsys.readouterr().err
    assert "models[0] (sd).sampling" in err and "'NoSuchScheduler' is not a diffusers scheduler class" in err
    assert not (tmp_path / "out").exists()


def test_per_row_negative_prompts_and_sizes_change_the_draws_and_bad_ones_are_rejected(ray_local, pipelines, tmp_path,
                                                                                        capsys):
    """input.negative_prompt_column and input.size_column (WIDTHxHEIGHT or a model's named preset): each row is
    drawn with its own, recorded in metadata; a size no model can draw is a rejected row; a family that cannot
    take them is refused naming the field."""
    from promptmill.models.hf_diffusers import DiffusersGenerator

    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle"] * 5, ["plain", "neg", "wide", "preset", "bad"],
                  negative=[None, "blurry photo", None, "blurry photo", None],
                  size=[None, None, "48x32", "tall", "47x32"])
    spec = _spec(tmp_path, pipelines["sd"], "sd", str(tmp_path / "out"))
    spec["models"][0]["images_per_prompt"] = 1
    spec["models"][0]["sizes"] = {"tall": "32x48"}
    spec["input"].update(negative_prompt_column="negative", size_column="size", keep_columns=["size"])
    res = run_job(load_spec(spec))
    assert res.rejected == {"bad_size": 1} and res.images_total == {"sd": 4}
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "metadata").to_pylist()}
    shapes = {i: decode_image((tmp_path / "out" / r["image_path"]).read_bytes()).shape for i, r in rows.items()}
    assert shapes == {"plain": (32, 32, 3), "neg": (32, 32, 3), "wide": (32, 48, 3), "preset": (48, 32, 3)}
    assert {i: (r["width"], r["height"]) for i, r in rows.items()} == {
        "plain": (32, 32), "neg": (32, 32), "wide": (48, 32), "preset": (32, 48)}
    assert rows["neg"]["negative_prompt"] == "blurry photo" and rows["plain"]["negative_prompt"] is None
    gen = DiffusersGenerator.load(pipelines["sd"], torch.device("cpu"))
    sampling = {k: v for k, v in SIZES["sd"].items() if k not in ("height", "width")}
    plain = decode_image((tmp_path / "out" / rows["plain"]["image_path"]).read_bytes()).astype(int)
    neg = decode_image((tmp_path / "out" / rows["neg"]["image_path"]).read_bytes()).astype(int)
    again = gen.generate(["a red circle"], [rows["neg"]["seed"]], height=32, width=32, negative_prompt="blurry photo",
                         **sampling)
    without = gen.generate(["a red circle"], [rows["neg"]["seed"]], height=32, width=32, **sampling)
    assert np.abs(again - neg).max() <= 2 and np.abs(without - neg).max() > 10  # the row's negative prompt drew it
    assert np.abs(plain - neg).max() > 10
    # a family that cannot take a per-row size: refused before anything, naming the field
    gan = make_spec(str(tmp_path / "in"), str(tmp_path / "o2"), {"gan": "shipped:gan"})
    gan["input"]["size_column"] = "size"
    (tmp_path / "gan.yaml").write_text(yaml.safe_dump(gan))
    assert main(["generate", str(tmp_path / "gan.yaml")]) == 2
    assert "input.size_column: models ['gan'] cannot take a per-row value" in capsys.readouterr().err


def test_without_a_judge_quality_signals_come_from_the_clip(ray_local, pipelines, tmp_path, monkeypatch):
    """Real images, no judge: diversity and near-duplicates from the CLIP image embeddings the scoring stage
    computes, an aesthetic score from a LAION-layout predictor on them, and FD / KID in CLIP space."""
    from promptmill.models.aesthetic import load_aesthetic
    from promptmill.models.clip_loader import load_clip
    from promptmill.pipelines.batch.diversity import annotate
    from tiny_hf import tiny_aesthetic

    clip_dir = str(tiny_hf_clip(tmp_path / "clip"))
    aesthetic = str(tiny_aesthetic(tmp_path / "aesthetic", width=16))
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", "a photo of a cat", "the dog on the left"],
                  ["a", "b", "c"])
    ref = tmp_path / "ref.parquet"
    from promptmill.models.shapes.scenes import example
    from promptmill.pipelines.layout import encode_image

    pq.write_table(pa.table({"png": [encode_image(example(i, 3, "test")[2], "png") for i in range(40)]}), ref)
    spec = _spec(tmp_path, pipelines["sd"], "sd", str(tmp_path / "out"))
    spec["models"][0]["images_per_prompt"] = 3
    spec["models"][0]["sampling"] = {**SIZES["sd"], "candidates": 2, "rerank_by": "aesthetic_score"}
    spec["scoring"] = {"clip": clip_dir, "judge": None, "aesthetic": aesthetic}
    spec["metrics"] = {"reference": str(ref), "max_images": 10}
    run_job(load_spec(spec))
    rows = pq.read_table(tmp_path / "out" / "metadata").to_pylist()
    assert all(r["judge_features"] is None and len(r["clip_features"]) == 16 for r in rows)
    assert all(r["diversity"] is not None and r["near_duplicate"] is not None for r in rows)
    scorer, predictor = load_clip(clip_dir), load_aesthetic(aesthetic)
    r = rows[0]
    emb = scorer.embed_images(decode_image((tmp_path / "out" / r["image_path"]).read_bytes())[None]).numpy()
    assert abs(predictor(emb)[0] - r["aesthetic_score"]) < 1e-3  # the predictor on the CLIP's embedding
    assert len({round(x["aesthetic_score"], 5) for x in rows}) > 1
    # best of 2 by the aesthetic score: each kept image is the better of its two candidates, drawn here again
    from promptmill.models.hf_diffusers import DiffusersGenerator
    from promptmill.models.rerank import candidate_seed

    gen = DiffusersGenerator.load(pipelines["sd"], torch.device("cpu"))
    for row in rows:
        assert (row["candidates"], row["rerank_by"]) == (2, "aesthetic_score")
        cands = gen.generate([row["prompt"]] * 2, [candidate_seed(row["seed"], k) for k in range(2)], **SIZES["sd"])
        marks = predictor(scorer.embed_images(cands).numpy())
        kept = decode_image((tmp_path / "out" / row["image_path"]).read_bytes()).astype(int)
        assert np.abs(kept - cands[int(np.argmax(marks))]).max() <= 2 and abs(marks.max() - row["aesthetic_score"]) < 1e-3
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["scores"]["sd"]["aesthetic_mean"] is not None
    assert summary["metrics"]["features"].startswith("CLIP image embeddings")
    m = summary["metrics"]["models"]
    assert m["sd"]["fid"] > m["real_vs_real"]["fid"] and m["sd"]["inception_score"] is None
    page = (tmp_path / "out" / "report.html").read_text()
    assert "<th>aesthetic_mean</th>" in page and "<th>diversity_mean</th>" in page
    assert "<th>prompt_match</th>" not in page and "<th>inception_score</th>" not in page  # null for every model
    # near-duplicates in CLIP space: a re-encode of an image sits closer to it than another image does, and a
    # threshold between the two flags the copies only (the threshold is the CLIP's: benchmarks/near_duplicates.py).
    # The tiny random CLIP puts many of these images close together, so "another" is the image of another prompt
    # it sets farthest from both the image and its re-encode
    img = decode_image((tmp_path / "out" / r["image_path"]).read_bytes())
    copy = decode_image(encode_image(img, "jpeg"))
    others = [decode_image((tmp_path / "out" / x["image_path"]).read_bytes()) for x in rows if x["id"] != r["id"]]
    e = scorer.embed_images(np.stack([img, copy, *others])).numpy()
    other = others[int(np.argmin(np.maximum(e[2:] @ e[0], e[2:] @ e[1])))]
    feats = scorer.embed_images(np.stack([img, copy, other])).numpy()
    same, diff = 1 - feats[0] @ feats[1], min(1 - feats[0] @ feats[2], 1 - feats[1] @ feats[2])
    assert same < diff, (same, diff)
    t = pa.table({"model": ["m"] * 3, "id": ["x"] * 3, "sample": [0, 1, 2],
                  "clip_features": pa.array(list(feats), pa.list_(pa.float32())),
                  "diversity": pa.nulls(3, pa.float32()), "near_duplicate": pa.nulls(3, pa.bool_())})
    assert annotate(t, (same + diff) / 2, "clip_features")["near_duplicate"].to_pylist() == [True, True, False]


def test_a_lora_changes_the_draws_its_removal_restores_them_and_a_resume_with_another_is_refused(
        ray_local, pipelines, s3, tmp_path, monkeypatch):
    """models[].loras from S3 through the pipeline's own LoRA loader; their content joins the checkpoint's id."""
    import s3fs
    from promptmill.pipelines.batch.preflight import PreflightError
    from tiny_hf import tiny_lora

    pytest.importorskip("peft")
    monkeypatch.setenv("PROMPTMILL_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(**s3)
    for name, seed in (("style", 0), ("other", 1)):
        fs.put(str(tiny_lora(Path(pipelines["sd"]), tmp_path / name, seed)) + "/", f"bucket/loras/{name}/",
               recursive=True)
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", "a blue square"], ["a", "b"])

    def run(out: str, loras: list) -> dict:
        spec = _spec(tmp_path, pipelines["sd"], "sd", str(tmp_path / out))
        spec["models"][0].update(loras=loras, storage_options=s3)
        run_job(load_spec(spec))
        return {(r["id"], r["sample"]): decode_image((tmp_path / out / r["image_path"]).read_bytes()).astype(int)
                for r in pq.read_table(tmp_path / out / "metadata").to_pylist()}

    plain = run("plain", [])
    styled = run("styled", [{"path": "s3://bucket/loras/style", "weight": 1.0}])
    again = run("again", [])
    assert all(np.abs(styled[k] - plain[k]).max() > 10 for k in plain)  # the adapter drew them
    assert all(np.abs(again[k] - plain[k]).max() <= 2 for k in plain)  # without it: the plain pipeline's pixels
    spec = _spec(tmp_path, pipelines["sd"], "sd", str(tmp_path / "styled"))
    spec["models"][0].update(loras=[{"path": "s3://bucket/loras/other", "weight": 1.0}], storage_options=s3)
    with pytest.raises(PreflightError, match="already holds model 'sd' with other settings"):
        run_job(load_spec(spec))
    spec["models"][0]["loras"] = [{"path": "s3://bucket/loras/missing"}]
    spec["output"]["path"] = str(tmp_path / "missing")
    with pytest.raises(PreflightError, match=r"models\[0\] \(sd\).loras\[0\].path"):
        run_job(load_spec(spec))
