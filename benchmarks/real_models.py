"""Real-size diffusers architectures through the job vs the bare pipeline, measured side by side in one run.

Random weights (throughput does not depend on weight values; no hub here): the Stable Diffusion 1.5 architecture
(UNet 320-640-1280-1280 with cross-attention 768, the 4-level KL VAE, a CLIP ViT-L/14 text encoder) and the
aMUSEd-256 architecture (UVit2D 22 x 1024, the 5-level VQ-GAN with 8192 codes, a CLIP ViT-L/14 text encoder with
projection). Tokenizers are small vocabularies padded to 77 tokens, as the real ones pad: the compute is the real
one. For each batch size:

  bare     the diffusers pipeline called directly on the batch, one torch.Generator for the batch (its fastest use)
  adapter  promptmill's generator seam (models/hf_diffusers.py): one generator per image, so pixels do not depend
           on the batch; aMUSEd's scheduler takes one generator per call, so the adapter draws it one image at a time
  job      `promptmill generate` as a user runs it (embedded Ray, started once before timing; scoring off; PNG files,
           metadata, commit), wall img/s at 2n images and marginal img/s from n to 2n images, n = max(batch, 2)
           (model load and start-up cancel out)

    python benchmarks/real_models.py [--models sd15,amused256] [--size 128] [--steps 2] [--batches 1,4,16]

`--numerics` instead times the SD 1.5 architecture through the adapter at each precision the device takes (fp32 and
bf16 on CPU; fp16 too on CUDA), with and without a LoRA on the UNet's attention (rank 8), side by side:

    python benchmarks/real_models.py --numerics [--size 64] [--steps 2] [--batches 2]

On CPU the default is a small resolution (128 px, 2 steps) so a run takes minutes; on CUDA (fp16, `--device cuda`)
the defaults are each model's native size (SD 512 px, aMUSEd 256 px).
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import diffusers
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import transformers
from promptmill.models.hf_diffusers import DiffusersGenerator
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.spec import load_spec

PROMPTS = ["a photo of a red fox in the snow", "an orange cat on a blue sofa", "a lighthouse at dusk, oil painting",
           "a bowl of ramen, studio lighting", "a green vintage car on a cobbled street", "a watercolor of a harbor"]


def tokenizer(d: Path) -> transformers.CLIPTokenizer:
    """A CLIPTokenizer over the prompts' words (no hub), padding to 77 like the real one."""
    words = sorted({w.strip(",.") for p in PROMPTS for w in p.split()})
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{w + "</w>": i + 2 for i, w in enumerate(words)}}
    for c in "abcdefghijklmnopqrstuvwxyz,.":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    return transformers.CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), model_max_length=77)


def clip_text_l14(**kw) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                       num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                                       bos_token_id=0, eos_token_id=1, pad_token_id=1, **kw)


def sd15(d: Path):
    unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the other defaults are SD 1.x's
    vae = diffusers.AutoencoderKL(block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
                                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=2,
                                  sample_size=512)
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                             timestep_spacing="trailing")
    return diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=transformers.CLIPTextModel(clip_text_l14()), tokenizer=tokenizer(d / "tok"), unet=unet,
        scheduler=sched, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def amused256(d: Path):
    transformer = diffusers.UVit2DModel(sample_size=16)  # the other defaults are aMUSEd's transformer
    vq = diffusers.VQModel(block_out_channels=[128, 256, 256, 512, 768], down_block_types=["DownEncoderBlock2D"] * 5,
                           up_block_types=["UpDecoderBlock2D"] * 5, latent_channels=64, layers_per_block=2,
                           num_vq_embeddings=8192, mid_block_add_attention=False, lookup_from_codebook=True,
                           force_upcast=True)
    return diffusers.AmusedPipeline(
        vqvae=vq, tokenizer=tokenizer(d / "tok"), transformer=transformer,
        text_encoder=transformers.CLIPTextModelWithProjection(clip_text_l14(projection_dim=768)),
        scheduler=diffusers.AmusedScheduler(mask_token_id=8255))  # vocab_size - 1


BUILD = {"sd15": (sd15, 512, {"guidance_scale": 0.0}), "amused256": (amused256, 256, {"guidance_scale": 0.0})}


def params(pipe) -> str:
    parts = {n: sum(p.numel() for p in m.parameters()) / 1e6 for n, m in pipe.components.items()
             if isinstance(m, torch.nn.Module)}
    return ", ".join(f"{n} {v:.0f}M" for n, v in parts.items())


def best_rate(fn, n: int, reps: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def bare_rates(name: str, build, tmp: Path, device: torch.device, dtype: torch.dtype, sampling: dict,
               batches: list[int], reps: int) -> list[list]:
    """Build the architecture, save it for the job, and time the bare pipeline and our adapter at each batch."""
    torch.manual_seed(0)
    t = time.perf_counter()
    pipe = build(tmp / name)
    pipe.save_pretrained(str(tmp / name))
    pipe = pipe.to(device, dtype)
    pipe.set_progress_bar_config(disable=True)
    print(f"{name}: {params(pipe)}; built and saved in {time.perf_counter() - t:.0f} s; {sampling}", flush=True)
    adapter = DiffusersGenerator(pipe, device)
    rows = []
    for b in batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(b)]
        bare = best_rate(lambda: pipe(prompt=prompts, generator=torch.Generator(device).manual_seed(0),  # noqa: B023
                                      output_type="np", **sampling), b, reps)
        ours = best_rate(lambda: adapter.generate(prompts, list(range(b)), **sampling), b, reps)  # noqa: B023
        rows.append([name, b, bare, ours])
        print(f"  batch {b:3d}: bare {bare:7.3f} img/s, adapter {ours:7.3f} img/s", flush=True)
    return rows


def with_lora(pipe, d: Path) -> Path:
    """A rank-8 LoRA on the UNet's attention projections, saved as diffusers writes one (safetensors)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe.unet.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    diffusers.StableDiffusionPipeline.save_lora_weights(str(d), unet_lora_layers=layers, safe_serialization=True)
    return d


def numerics(tmp: Path, device: torch.device, size: int, steps: int, batch: int, reps: int) -> None:
    """The adapter's img/s per precision, with and without a LoRA, on one SD 1.5-architecture directory."""
    from promptmill.pipelines.spec import LoraSpec

    torch.manual_seed(0)
    pipe = sd15(tmp / "sd15")
    pipe.save_pretrained(str(tmp / "sd15"))
    lora = with_lora(pipe, tmp / "lora")
    del pipe
    sampling = {"num_inference_steps": steps, "height": size, "width": size, "guidance_scale": 0.0}
    prompts, seeds = [PROMPTS[i % len(PROMPTS)] for i in range(batch)], list(range(batch))
    precisions = ["fp32", "bf16", *(["fp16"] if device.type == "cuda" else [])]
    rates = {}
    for precision in precisions:
        for loras in ([], [LoraSpec(path=str(lora))]):
            gen = DiffusersGenerator.load(str(tmp / "sd15"), device, precision=precision, loras=loras)
            rates[precision, bool(loras)] = best_rate(lambda: gen.generate(prompts, seeds, **sampling), batch, reps)  # noqa: B023
            gen = None  # the next load's memory
            gc.collect()
    print(f"\nsd15 architecture, {size} px, {steps} steps, batch {batch}, device={device}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"{'precision':10} {'img/s':>8} {'with LoRA':>10} {'LoRA/plain':>11} {'vs fp32':>8}")
    for precision in precisions:
        plain, lora_rate = rates[precision, False], rates[precision, True]
        print(f"{precision:10} {plain:8.3f} {lora_rate:10.3f} {lora_rate / plain:11.2f} "
              f"{plain / rates['fp32', False]:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="sd15,amused256")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, help="image height and width (default: 128 on CPU, native on CUDA)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--numerics", action="store_true", help="precision and LoRA cost through the adapter instead")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.numerics:
        with tempfile.TemporaryDirectory() as tmp:
            numerics(Path(tmp), device, args.size or (512 if device.type == "cuda" else 64), args.steps,
                     int(args.batches.split(",")[0]) if args.batches != "1,4,16" else 2, args.reps)
        return
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    batches = [int(b) for b in args.batches.split(",")]
    import ray

    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # start-up excluded from the job figures
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            build, native, extra = BUILD[name]
            size = args.size or (native if device.type == "cuda" else 128)
            sampling = {"num_inference_steps": args.steps, "height": size, "width": size, **extra}
            rows += bare_rates(name, build, Path(tmp), device, dtype, sampling, batches, args.reps)
            gc.collect()
            for row in (r for r in rows if r[0] == name):
                b = row[1]
                n = max(b, 2)
                rates = []
                for k, count in enumerate((n, 2 * n)):
                    ids = [f"p{i}" for i in range(count)]
                    src = f"{tmp}/in-{name}-{b}-{k}.parquet"
                    pq.write_table(pa.table({"id": ids, "prompt": [PROMPTS[i % len(PROMPTS)] for i in range(count)]}),
                                   src)
                    spec = load_spec({
                        "name": "bench", "input": {"path": src, "id_column": "id"},
                        "models": [{"name": name, "family": "diffusers", "checkpoint": f"{tmp}/{name}",
                                    "sampling": sampling, "resources": {"batch_size": b, "num_gpus": int(
                                        device.type == "cuda")}}],
                        "scoring": {"enabled": False}, "output": {"path": f"{tmp}/out-{name}-{b}-{k}", "report": False}})
                    t = time.perf_counter()
                    res = run_job(spec)
                    rates.append((count, time.perf_counter() - t))
                    assert res.images_written == {name: count}
                (n1, t1), (n2, t2) = rates
                row += [n2 / t2, (n2 - n1) / (t2 - t1)]
                print(f"  batch {b:3d}: job {n2} images {n2 / t2:7.3f} img/s wall, "
                      f"{(n2 - n1) / (t2 - t1):7.3f} marginal ({n1}->{n2})", flush=True)
    print(f"\ndevice={device} dtype={str(dtype).split('.')[-1]} torch threads={torch.get_num_threads()}")
    print(f"{'model':10} {'batch':>5} {'bare':>8} {'adapter':>8} {'job wall':>9} {'job marg':>9}   "
          f"{'adapter/bare':>12} {'job/bare wall':>13} {'job/bare marg':>13}")
    for name, b, bare, ours, wall, marg in rows:
        print(f"{name:10} {b:5d} {bare:8.3f} {ours:8.3f} {wall:9.3f} {marg:9.3f}   {ours / bare:12.2f} "
              f"{wall / bare:13.2f} {marg / bare:13.2f}")
    print("img/s; bare and adapter best of --reps after a warm-up; job wall at 2n images includes model load")


if __name__ == "__main__":
    main()
