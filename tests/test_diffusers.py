"""The diffusers family on tiny random pipelines built here (diffusers' own test recipe): Stable Diffusion and
aMUSEd directories, saved locally and to moto S3, through the full generate job. Needs the optional extra."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_spec, write_prompts

diffusers = pytest.importorskip("diffusers", reason="pip install 'promptmill[diffusers]'")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from jobs.cli import main  # noqa: E402
from models.images import decode_image  # noqa: E402
from pipelines.batch.job import run_job  # noqa: E402
from pipelines.spec import load_spec  # noqa: E402

WORDS = ["a", "red", "blue", "green", "circle", "square", "photo", "of", "cat", "dog", "the", "on", "left"]


def clip_tokenizer(d: Path):
    """A CLIPTokenizer from a vocabulary written here (no hub): whole words and letters, one-line merges."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for w in WORDS:
        vocab[w + "</w>"] = len(vocab)
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=16)


def text_config(tok, **kw):
    return transformers.CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32,
                                       intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                                       vocab_size=len(tok), max_position_embeddings=16, **kw)


def tiny_sd(d: Path) -> Path:
    torch.manual_seed(0)
    tok = clip_tokenizer(d.parent / "tok-sd")
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2)
    vae = diffusers.AutoencoderKL(block_out_channels=[4, 8], in_channels=3, out_channels=3, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  norm_num_groups=2, sample_size=32)
    sched = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                    set_alpha_to_one=False)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=transformers.CLIPTextModel(text_config(tok)),
                                             tokenizer=tok, unet=unet, scheduler=sched, safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(d))
    return d


def tiny_amused(d: Path) -> Path:
    torch.manual_seed(0)
    tok = clip_tokenizer(d.parent / "tok-amused")
    transformer = diffusers.UVit2DModel(
        hidden_size=32, cond_embed_dim=32, micro_cond_encode_dim=2, micro_cond_embed_dim=10, encoder_hidden_size=32,
        vocab_size=32, codebook_size=32, in_channels=8, block_out_channels=8, num_res_blocks=1, downsample=True,
        upsample=True, block_num_heads=1, num_hidden_layers=1, num_attention_heads=1, intermediate_size=8,
        sample_size=4)
    vq = diffusers.VQModel(block_out_channels=[8], down_block_types=["DownEncoderBlock2D"], in_channels=3,
                           latent_channels=8, layers_per_block=1, norm_num_groups=8, num_vq_embeddings=32,
                           out_channels=3, sample_size=8, up_block_types=["UpDecoderBlock2D"],
                           mid_block_add_attention=False, lookup_from_codebook=True)
    pipe = diffusers.AmusedPipeline(vqvae=vq, tokenizer=tok, transformer=transformer,
                                    text_encoder=transformers.CLIPTextModelWithProjection(text_config(tok, projection_dim=32)),
                                    scheduler=diffusers.AmusedScheduler(mask_token_id=31))  # codebook size - 1
    pipe.save_pretrained(str(d))
    return d


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


@pytest.mark.parametrize("kind", ["sd", "amused"])
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
    images = {k: decode_image(Path(r["image_path"]).read_bytes()) for k, r in rows.items()}
    assert all(im.shape == (size, size, 3) for im in images.values())
    assert run_job(load_spec(_spec(tmp_path, pipelines[kind], kind, str(tmp_path / "out")))).skipped  # exactly once
    # batch size 1 on a fresh output: the same draws (one generator per image). A batched UNet is not bit-identical
    # to one image at a time, so pixels agree to float rounding, not bit for bit (our own families: bit for bit)
    run_job(load_spec(_spec(tmp_path, pipelines[kind], kind, str(tmp_path / "out1"), batch=1)))
    rows1 = {(r["id"], r["sample"]): r for r in pq.read_table(tmp_path / "out1" / "metadata").to_pylist()}
    for k, r in rows1.items():
        one = decode_image(Path(r["image_path"]).read_bytes()).astype(int)
        assert np.abs(one - images[k]).max() <= 2, (k, np.abs(one - images[k]).max())
    other_seed = images[("a", 1)].astype(int) - images[("a", 0)]
    assert np.abs(other_seed).max() > 20  # while another seed is another image


def test_a_pipeline_on_s3_is_cached_once_and_bad_input_exits_2(ray_local, pipelines, s3, tmp_path, capsys, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.put(pipelines["sd"] + "/", "bucket/models/sd/", recursive=True)
    monkeypatch.setenv("PROMPTMILL_CACHE", str(tmp_path / "cache"))
    from models.hf_diffusers import local_copy

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
    from models.hf_diffusers import DiffusersGenerator

    gen = DiffusersGenerator.load(pipelines["sd"], torch.device("cpu"))
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by the loader: never a hub download at run time
    assert gen.generate(["a red circle"], [7], **SIZES["sd"]).shape == (1, 32, 32, 3)


def tiny_hf_clip(d: Path) -> Path:
    torch.manual_seed(0)
    tok = clip_tokenizer(d.parent / "tok-clip")
    config = transformers.CLIPConfig(
        text_config=dict(bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37,
                         num_attention_heads=4, num_hidden_layers=2, vocab_size=len(tok), max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8), projection_dim=16)
    image_proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    transformers.CLIPModel(config).save_pretrained(str(d))
    transformers.CLIPProcessor(image_processor=image_proc, tokenizer=tok).save_pretrained(str(d))
    return d


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
    from torchmetrics.multimodal.clip_score import CLIPScore

    from models.clip import load_clip

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
    # end to end: a diffusers model scored by the HF CLIP, clip_score in every row, report written
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", "a photo of a cat"], ["a", "b"])
    spec = _spec(tmp_path, pipelines["sd"], "sd", str(tmp_path / "out"))
    spec["scoring"] = {"clip": clip_dir, "judge": None}
    run_job(load_spec(spec))
    rows = pq.read_table(tmp_path / "out" / "metadata").to_pylist()
    assert len(rows) == 4 and all(r["clip_score"] is not None and 0 <= r["clip_score"] <= 100 for r in rows)
    assert all(r["prompt_match"] is None for r in rows) and (tmp_path / "out" / "report.html").exists()


def test_stage_model_copies_checks_and_loads_from_storage(pipelines, s3, tmp_path, capsys, monkeypatch):
    import shutil

    monkeypatch.setenv("PROMPTMILL_CACHE", str(tmp_path / "cache"))
    opts = [f"--storage-option={k}={v}" for k, v in s3.items()]
    assert main(["stage-model", pipelines["sd"], "s3://bucket/staged/sd", *opts, "--load"]) == 0
    out = capsys.readouterr().out
    assert "diffusers) -> s3://bucket/staged/sd; loads from there" in out and out.startswith("staged 10 files")
    broken = tmp_path / "broken"
    shutil.copytree(pipelines["sd"], broken)
    shutil.rmtree(broken / "unet")  # model_index.json still names it
    assert main(["stage-model", str(broken), "s3://bucket/staged/broken", *opts]) == 2
    assert "names components with no folder: ['unet']" in capsys.readouterr().err


def test_an_unfinished_cache_entry_is_replaced(pipelines, s3, tmp_path, monkeypatch):
    import s3fs

    from models.hf_diffusers import INDEX
    from models.local_cache import cache_dir, local_copy

    monkeypatch.setenv("PROMPTMILL_CACHE", str(tmp_path / "cache"))
    s3fs.S3FileSystem(**s3).put(pipelines["amused"] + "/", "bucket/models/amused/", recursive=True)
    first = Path(local_copy("s3://bucket/models/amused", s3))
    (first / ".promptmill-complete").unlink()  # as a crashed copy (or an older version's) would leave it
    (first / INDEX).unlink()
    assert Path(local_copy("s3://bucket/models/amused", s3)) == first and (first / INDEX).exists()
    assert first.parent == cache_dir()
