"""Issue 17's table on a GPU, measured side by side in one run: the bare model against `promptmill generate`.

For the shipped checkpoints and for real-size architectures with random weights (a 300M-parameter DALL-E-style
Transformer drawing 256 VQ tokens into 128 px images; a 256 px GAN), on CUDA:
  bare        `load_generator(..., "cuda").generate` in a batched loop (this process), at the spec's precision;
              + score: the job's scorers on the same GPU, back to back
  job         `promptmill generate SPEC` as a user runs it (a fresh process, embedded Ray, `num_gpus: 1`, PNG files,
              metadata, commit), steady state = images after the first batch / the `images` phase of summary.json
  GPU busy    NVML utilisation (share of time a kernel ran), sampled every 0.1 s: during the bare loop, and during
              the job's `images` phase
  sharing     a small model's job with several actors sharing the one GPU (one actor's CPU-side encode and write
              capped the shipped GAN at ~2k img/s on the H200)
  write_in    the default beside a GPU model (`output.write_in: tasks`, write tasks over the node's CPUs) against
              the generator actor writing (`actors`, the default before and on CPU)
  sweep       bare images/s by batch size and precision

    python benchmarks/gpu.py [--out DIR] [--budget-s 420]   (a CUDA machine; --device cpu checks the script)

A machine with a CUDA torch but without Ray and pydantic gets them from `benchmarks/device_bundle.sh` (built
here, carried there; its header says how).

Prints markdown tables and writes them with the raw figures to DIR (gpu.md, gpu.json) as each part finishes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from jobrun import SHIPPED_NAME, one_model_spec, run_generate, write_prompts  # benchmarks/: first on sys.path
from promptmill.models import load_generator
from promptmill.models.checkpoint import save_checkpoint
from promptmill.models.families import generator_class
from promptmill.models.images import decode_image
from promptmill.models.precision import at_precision
from promptmill.pipelines.batch.job import PHASES
from promptmill.pipelines.batch.score import ScoreStage
from promptmill.pipelines.spec import SHIPPED, ScoringSpec

# real-size architectures (random weights): DALL-E-mini-like widths, 16x16 tokens of an 8192-code VQ; a 256 px GAN
REAL = {
    "transformer": {"config": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "image_tokens": 256, "image_vocab": 8192},
                    "vq": {"image_size": 128, "downsample": 8, "codebook_size": 8192, "hidden": 128, "embed_dim": 256}},
    "gan": {"config": {"image_size": 256, "ngf": 64, "ndf": 64}},
}


SCORED_MAX = 2048  # images in a scored job


class GpuBusy:
    """NVML utilisation samples (time, %) from a thread; None where NVML is missing (a CPU dry run)."""

    def __init__(self, every_s: float = 0.1) -> None:
        self.samples: list[tuple[float, int]] = []
        self.every_s, self.stop = every_s, threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle, self.nvml = pynvml.nvmlDeviceGetHandleByIndex(0), pynvml
        except Exception:  # noqa: BLE001 - no NVML: busy % is reported as n/a
            self.handle = None
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set() and self.handle is not None:
            self.samples.append((time.perf_counter(), self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu))
            time.sleep(self.every_s)

    def mean(self, t0: float, t1: float) -> float | None:
        xs = [u for t, u in self.samples if t0 <= t <= t1]
        return float(np.mean(xs)) if xs else None


def real_checkpoint(family: str, out: Path) -> str:
    """The shipped checkpoint's config (tokenizer, text encoder) with REAL's sizes, random weights, fp16 on disk."""
    config = json.loads((SHIPPED / SHIPPED_NAME[family] / "config.json").read_text())
    for part, values in REAL[family].items():
        config[part] = {**config[part], **values}
    gen = generator_class(family).from_config(config, torch.device("cpu"))
    save_checkpoint(str(out), gen.state_dict(), config, dtype=torch.float16)
    return str(out)


def bare(ckpt: str, device: str, prompts: list[str], batch: int, precision: str, busy: GpuBusy,
         score: bool = False) -> dict:
    """images/s of generate (and of generate then score) in a batched loop after one warm-up batch; GPU busy."""
    gen = at_precision(load_generator(ckpt, device), device, precision)
    gen.generate(prompts[:batch], list(range(batch)))
    t0 = time.perf_counter()
    images = [gen.generate(prompts[i:i + batch], list(range(i, i + batch))) for i in range(0, len(prompts), batch)]
    t1 = time.perf_counter()
    out = {"img_s": len(prompts) / (t1 - t0), "busy": busy.mean(t0, t1)}
    if score:
        scorer = ScoreStage(ScoringSpec(), device)
        scorer.score(np.asarray(images[0]), prompts[:batch])
        t2 = time.perf_counter()
        for i, imgs in zip(range(0, len(prompts), batch), images):
            scorer.score(np.asarray(imgs), prompts[i:i + batch])
        out["scored_img_s"] = len(prompts) / (t1 - t0 + time.perf_counter() - t2)
    del gen
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def job(tmp: Path, name: str, family: str, ckpt: str, n: int, batch: int, precision: str, scoring: bool,
        gpus: float, busy: GpuBusy, calls: int | None = None, actors: int = 1, write_in: str | None = None) -> dict:
    """Steady-state images/s of `promptmill generate` and the GPU busy % over its images phase; `actors` > 1 share
    the `gpus` (each asks for gpus / actors)."""
    resources = {"batch_size": batch, "num_gpus": gpus / actors,
                 **({"actors": actors, "max_actors": actors} if actors > 1 else {}),
                 **({"concurrent_calls": calls} if calls else {})}
    spec = one_model_spec("gpu", tmp / f"in-{n}.parquet", tmp / name, family, scoring, resources)
    spec["models"][0].update(checkpoint=ckpt, precision=precision)
    if write_in:
        spec["output"]["write_in"] = write_in
    wall, summary = run_generate(tmp, name, spec, settle=False)  # another disk: its probe is recorded, not waited on
    assert summary["images_total"] == {"m": n}, summary["images_total"]
    p = summary["phases_s"]
    start = summary["started_at"] + summary["outside_s"]["start"] + sum(p[k] for k in PHASES[:PHASES.index("images")] if k in p)
    return {"wall_s": wall, "wall_img_s": n / wall, "img_s": (n - batch) / p["images"],
            "busy": busy.mean(start, start + p["images"]), "phases_s": p, "out": str(tmp / name)}


def same_pixels(out: Path, ckpt: str, device: str, precision: str, n: int = 64) -> dict:
    """The job's first n images (decoded from its files) against the bare model's for the same prompts and seeds,
    drawn in one batch: the contract says an image depends on (prompt, seed, sampling) alone."""
    rows = pq.read_table(out / "metadata", columns=["prompt", "seed", "image_path"]).slice(0, n).to_pylist()
    gen = at_precision(load_generator(ckpt, device), device, precision)
    drawn = gen.generate([r["prompt"] for r in rows], [int(r["seed"]) for r in rows])
    diffs = [int(np.abs(decode_image((out / r["image_path"]).read_bytes()).astype(int) - im).max())
             for r, im in zip(rows, drawn)]
    return {"images": len(rows), "identical": sum(d == 0 for d in diffs), "max_abs_diff": max(diffs)}


def table(title: str, head: list[str], rows: list[list]) -> str:
    def cell(v):
        return "n/a" if v is None else f"{v:.2f}" if isinstance(v, float) and abs(v) < 10 else (
            f"{v:.0f}" if isinstance(v, float) else str(v))
    return "\n".join([f"\n{title}\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
                      *["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--out", type=Path, default=Path("gpu-bench"))
    ap.add_argument("--budget-s", type=float, default=420, help="skip what would start after this many seconds")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every image count")
    ap.add_argument("--check", action="store_true", help="a quick run of the script itself on CPU: small counts, "
                    "real-size models shrunk")
    ap.add_argument("--runs", default="real-transformer,gan,transformer,real-gan", help="which models, in order")
    ap.add_argument("--no-scored", dest="scored", action="store_false", help="shipped models: scoring off only")
    ap.add_argument("--sweep", default="gan:64,1024;transformer:64;real-transformer:128;real-gan:64",
                    help="bare sweep, model:batches;... (fp32 and bf16 each)")
    args = ap.parse_args()
    if args.check:
        args.device, args.scale = "cpu", 0.01
        REAL["transformer"]["config"].update(n_layer=2, n_head=2, n_embd=64, image_tokens=64)
        REAL["transformer"]["vq"].update(image_size=64, hidden=32, embed_dim=32)
        REAL["gan"]["config"].update(image_size=64, ngf=16, ndf=16)
    cpu = args.device == "cpu"
    gpus = 0 if cpu else 1
    args.out.mkdir(parents=True, exist_ok=True)
    began, busy, results, md = time.perf_counter(), GpuBusy(), {"device": args.device}, []
    if not cpu:
        results["gpu"] = torch.cuda.get_device_name(0)

    def n_of(n: int, batch: int) -> int:
        return max(2 * batch, int(n * args.scale) // batch * batch)

    def emit(text: str) -> None:
        print(text, flush=True)
        md.append(text)
        (args.out / "gpu.md").write_text("\n".join(md) + "\n")
        (args.out / "gpu.json").write_text(json.dumps(results, indent=1, default=str))

    def in_budget(what: str) -> bool:
        left = args.budget_s - (time.perf_counter() - began)
        if left <= 0:
            emit(f"- skipped (budget spent): {what}")
        return left > 0

    # (label, family, checkpoint, precision, batch, job images, scored too, concurrent_calls to compare,
    #  actors sharing the one GPU to compare: for a small model one actor's encode + write on the CPU set the pace;
    #  output.write_in to compare with the default)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        real = {f: real_checkpoint(f, tmp / f"real-{f}") for f in REAL}
        every = {"gan": ("GAN, shipped", "gan", str(SHIPPED / "gan"), "fp32", 64, 16384, args.scored, [8], [4],
                         ["actors"]),
                 "transformer": ("Transformer, shipped", "transformer", str(SHIPPED / "dalle"), "fp32", 64, 4096,
                                 args.scored, [], [], []),
                 "real-transformer": ("Transformer, 300M real-size, bf16", "transformer", real["transformer"], "bf16",
                                      128, 1024, False, [1], [], ["actors"]),
                 "real-gan": ("GAN, 256 px real-size, bf16", "gan", real["gan"], "bf16", 64, 2048, False, [8], [2],
                                              ["actors"])}
        runs = [every[k] for k in args.runs.split(",")]
        prompt_cache: dict[int, list[str]] = {}
        rows, detail, shared, writes = [], [], [], []
        for label, family, ckpt, precision, batch, n_job, scored, other_calls, sharing, write_in in runs:
            if not in_budget(label):
                continue
            n = n_of(n_job, batch)
            if n not in prompt_cache:
                prompt_cache[n] = write_prompts(tmp / f"in-{n}.parquet", n)
            prompts = prompt_cache[n]
            b = bare(ckpt, args.device, prompts[:n_of(n_job // 2, batch)], batch, precision, busy, score=scored)
            r = {"bare": b}
            for scoring in ([False, True] if scored else [False]):
                key = "scored" if scoring else "plain"
                # scored: the CPU-side scorers set the pace (~80 img/s on the H200 before the faster geometry check,
                # 16,384 images took 227 s of a 15-minute lease), so fewer images
                m = n_of(min(n_job, SCORED_MAX), batch) if scoring else n
                if m not in prompt_cache:
                    prompt_cache[m] = write_prompts(tmp / f"in-{m}.parquet", m)
                r[key] = job(tmp, f"{family}-{len(rows)}-{key}", family, ckpt, m, batch, precision, scoring, gpus, busy)
                base = b["scored_img_s"] if scoring else b["img_s"]
                rows.append([label, "on" if scoring else "off", batch, base, b["busy"], r[key]["img_s"],
                             r[key]["wall_img_s"], r[key]["img_s"] / base, r[key]["busy"]])
            r["same_pixels"] = same_pixels(Path(r["plain"]["out"]), ckpt, args.device, precision)
            # each variant against the default job: (its table, key, what, the value shown, job's arguments)
            variants = ([(detail, f"calls{c}", f"concurrent_calls {c}", c, {"calls": c}) for c in other_calls]
                        + [(shared, f"actors{a}", f"{a} actors sharing the GPU", a, {"actors": a}) for a in sharing]
                        + [(writes, f"write_{w}", f"write_in {w}", w, {"write_in": w}) for w in write_in])
            for into, key, what, value, kwargs in variants:
                if in_budget(f"{label} {what}"):
                    r[key] = job(tmp, f"{family}-{len(rows)}-{key}", family, ckpt, n, batch, precision, False, gpus,
                                 busy, **kwargs)
                    into.append([label, value, r[key]["img_s"], r["plain"]["img_s"], r[key]["busy"],
                                 r["plain"]["busy"]])
            results[label] = r
            emit(table(f"after {label} ({time.perf_counter() - began:.0f} s):",
                       ["model", "scoring", "batch", "bare img/s", "bare GPU busy %", "job img/s (steady)",
                        "job img/s (wall)", "job / bare", "job GPU busy %"], rows))
        emit(table("the job's images against the bare model's, same prompts and seeds (scoring off run):",
                   ["model", "images", "identical", "max abs diff (0-255)"],
                   [[k, v["same_pixels"]["images"], v["same_pixels"]["identical"], v["same_pixels"]["max_abs_diff"]]
                    for k, v in results.items() if isinstance(v, dict) and "same_pixels" in v]))
        if detail:
            emit(table("concurrent_calls against the default (2 on a GPU), scoring off:",
                       ["model", "calls", "job img/s", "default img/s", "GPU busy %", "default busy %"], detail))
        if shared:
            emit(table("actors sharing the one GPU (each num_gpus 1/actors) against one actor, scoring off:",
                       ["model", "actors", "job img/s", "one actor img/s", "GPU busy %", "one actor busy %"], shared))
        if writes:
            emit(table("output.write_in against the default beside a GPU model (tasks), scoring off:",
                       ["model", "write_in", "job img/s", "default img/s", "GPU busy %", "default busy %"], writes))
        sweep, pool = [], write_prompts(tmp / "sweep.parquet", 1024)
        for item in args.sweep.split(";"):
            key, batches = item.split(":")
            label, _, ckpt = every[key][:3]
            for precision in ("fp32", "bf16"):
                for batch in [int(b) for b in batches.split(",")]:
                    if in_budget(f"sweep {label} {precision} {batch}"):
                        b = bare(ckpt, args.device, [pool[i % len(pool)] for i in range(3 * batch)], batch,
                                 precision, busy)
                        sweep.append([label, precision, batch, b["img_s"], b["busy"]])
                        results.setdefault("sweep", []).append(sweep[-1])
        emit(table("bare model by batch and precision:", ["model", "precision", "batch", "img/s", "GPU busy %"], sweep))
    busy.stop.set()
    emit(f"\ntotal {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
