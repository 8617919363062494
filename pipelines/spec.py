"""The job spec: pydantic v2, loaded from YAML, overridable with `--set a.b=c`, redacted for summaries."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from types import NoneType, UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from promptmill.models.families import installed_families
from promptmill.pipelines.layout import IMAGE_FORMATS, OUTPUT_FORMATS, SAFE_NAME
from promptmill.pipelines.redaction import ENV_REF, redact, remember_secret
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_EXPONENT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


SIZED_FAMILIES = ("diffusers",)  # families whose generate takes height / width and a negative prompt per call
JUDGED_FAMILIES = ("transformer", "gan")  # families that draw the shapes domain, where the judge's prompt_match reads
# best-of-K's choosers (`sampling.rerank_by`): the per-image score columns it can order candidates by
# (models.rerank.CHOOSERS, which holds the same names; importing it here would import torch)
RERANK_BY = ("clip_score", "prompt_match", "aesthetic_score")
RERANK_KEYS = ("candidates", "rerank_by")  # sampling keys the job handles itself, not the family
_SIZE = re.compile(r"([1-9][0-9]{0,3})x([1-9][0-9]{0,3})")


def parse_size(value: str) -> tuple[int, int] | None:
    """"1024x576" -> (width, height), each a multiple of 8 in [8, 4096]; None when it is not one."""
    m = _SIZE.fullmatch(value.strip()) if isinstance(value, str) else None
    if m is None:
        return None
    w, h = int(m[1]), int(m[2])
    return (w, h) if all(8 <= v <= 4096 and v % 8 == 0 for v in (w, h)) else None


def _path_safe(v: str) -> str:
    if not SAFE_NAME.fullmatch(v):
        raise ValueError(f"{v!r} is not path-safe (letters, digits, '.', '_', '-'; no leading dot)")
    return v


SafeName = Annotated[str, AfterValidator(_path_safe)]  # becomes part of output paths
OutputFormat = Literal[OUTPUT_FORMATS]  # type: ignore[valid-type]
ImageFormat = Literal[tuple(IMAGE_FORMATS)]  # type: ignore[valid-type]
Precision = Literal["fp32", "bf16", "fp16"]  # models.precision.DTYPES


class SpecError(ValueError):
    """A spec that cannot run; the message names the field path and the bad value."""


class Strict(BaseModel):
    # strict: "3" is not silently 3 (a quoted number in YAML is a mistake worth naming)
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), strict=True)


class Blocklist(Strict):
    words: list[str] = Field(default_factory=list, description="whole words or phrases, case-insensitive")
    patterns: list[str] = Field(default_factory=list, description="Python regular expressions (re.search, "
                                "case-insensitive)")

    @field_validator("patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for i, p in enumerate(v):
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"patterns[{i}] {p!r} is not a valid regular expression: {e}") from None
        return v

    def compiled(self) -> re.Pattern | None:
        """One alternation: whole-word matches of `words`, plus `patterns` as written."""
        alts = [rf"\b{re.escape(w.strip())}\b" for w in self.words if w.strip()] + [f"(?:{p})" for p in self.patterns]
        return re.compile("|".join(alts), re.IGNORECASE) if alts else None


class InputSpec(Strict):
    path: str = Field(description="Parquet, CSV, TSV or JSON Lines (.jsonl/.json) file, directory or glob, each "
                      "optionally .gz/.bz2/.zst/.xz compressed; local path or any fsspec URL")
    format: Literal["auto", "parquet", "csv", "tsv", "jsonl"] = Field(
        default="auto", description="the input files' format; auto: from their names (no known suffix: Parquet); "
        "CSV / TSV columns are read as text")
    prompt_column: str = Field(default="prompt", description="column holding the prompt text")
    id_column: str | None = Field(
        default=None, description="column with a unique, path-safe row id; None derives one from file + row"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="passed to fsspec (s3fs: endpoint_url, key, secret, anon, ...)")
    limit: int | None = Field(default=None, ge=1, description="read only the first N rows (in file order)")
    max_prompt_chars: int = Field(default=1000, ge=1, le=100_000, description="longer prompts are rejected")
    truncate: bool = Field(default=True, description="a prompt over a model's text-encoder token limit: true draws "
                           "it cut to the limit with prompt_truncated = true in the metadata; false rejects it "
                           "(reason prompt_too_many_tokens)")
    blocklist: Blocklist = Field(default_factory=lambda: Blocklist(), description="brand safety: matching prompts "
                                 "are rejected with reason 'blocked'")
    negative_prompt_column: str | None = Field(default=None, description="column with a per-row negative prompt "
                                               "(null: the model's sampling.negative_prompt); recorded in metadata; "
                                               "for families that take one (diffusers)")
    size_column: str | None = Field(default=None, description="column with a per-row image size, WIDTHxHEIGHT "
                                    "(1024x576) or a preset name every model defines (models[].sizes); null: the "
                                    "model's size; for families that take one (diffusers)")
    keep_columns: list[str] = Field(default_factory=list, description="input columns carried into each image's "
                                    "metadata row (an ad catalog's sku, template, campaign); every input file must "
                                    "have them, and none may be named like a metadata column")

    @field_validator("keep_columns")
    @classmethod
    def _keep_columns(cls, v: list[str]) -> list[str]:
        from promptmill.pipelines.layout import METADATA_SCHEMA

        taken = sorted(set(v) & (set(METADATA_SCHEMA.names) | {"pixels", "generation_error", "pm_id", "pm_reason",
                                                                 "row_hash"}))
        if taken:
            raise ValueError(f"{taken} are columns promptmill writes itself; rename them in the input")
        if len(set(v)) != len(v):
            raise ValueError(f"{v} names a column twice")
        return v


class Resources(Strict):
    actors: int = Field(default=1, ge=1, le=1024, description="actor pool minimum size")
    max_actors: int = Field(default=1, ge=1, le=1024, description="actor pool maximum size (autoscaling). When "
                            "actors, max_actors and threads are all unset, a CPU pool on this machine alone with 1,024 "
                            "images or more per actor to make may grow to one single-threaded actor per core (as "
                            "many as fit in a quarter of the memory, shared by the pools), holding one actor's "
                            "CPUs between them")
    num_gpus: float = Field(default=0, ge=0, le=16, description="GPUs per actor; > 0 runs the model on CUDA")
    num_cpus: float = Field(default=1, gt=0, le=256, description="CPUs per actor (what Ray reserves for it)")
    threads: int | None = Field(default=None, ge=1, le=256, description="torch CPU threads in each actor; null: "
                                "the CPUs it holds (num_cpus), or, when the job runs on this machine alone "
                                "(embedded Ray, a one-node local head), the machine's cores shared among the pools' "
                                "actors")
    batch_size: int = Field(default=32, ge=1, le=4096, description="images per generate call")
    concurrent_calls: int | None = Field(default=None, ge=1, le=8, description="batches each generator actor works on at once: "
                                         "they take turns on the device (generate, score) and encode and write "
                                         "beside it, so the next batch draws while this one is written; null: 2 "
                                         "with a GPU, 1 on CPU (where the calls would share the same cores)")

    @model_validator(mode="after")
    def _pool(self) -> Resources:
        if self.max_actors < self.actors:
            raise ValueError(f"max_actors ({self.max_actors}) < actors ({self.actors})")
        return self


MAX_IMAGES_PER_CALL = 16_384  # candidates x batch_size: the images one actor holds at once
# the trained checkpoints that come with promptmill: package data of `models`, beside the code in a checkout, a
# wheel install or a job's working_dir alike
SHIPPED = Path(__file__).resolve().parents[1] / "models" / "checkpoints"
SHIPPED_REF = "shipped:"


def shipped_names() -> list[str]:
    return sorted(p.parent.name for p in SHIPPED.glob("*/config.json"))


def _checkpoint_ref(v: str | None) -> str | None:
    """`shipped:NAME` is a checkpoint that comes with promptmill, found where this process has it installed: a
    spec names it so without knowing the install path (and a submitted spec resolves on the cluster)."""
    if v is None or not v.startswith(SHIPPED_REF):
        return v
    name = v[len(SHIPPED_REF):]
    if name not in shipped_names():
        raise ValueError(f"{v!r}: no shipped checkpoint {name!r}; shipped: {shipped_names()}")
    return str(SHIPPED / name)


CheckpointRef = Annotated[str, AfterValidator(_checkpoint_ref)]


class LoraSpec(Strict):
    path: str = Field(description="a LoRA adapter folder (safetensors, as diffusers' save_lora_weights writes it): "
                      "local path or any fsspec URL; the model's storage_options apply")
    weight: float = Field(default=1.0, ge=-10, le=10, description="its scale in the pipeline's set_adapters")
    weight_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,128}\.safetensors$",
                                    description="the file in the folder, when it holds more than one")


class ModelSpec(Strict):
    name: SafeName = Field(description="used in output paths and metadata; path-safe, unique in the job")
    family: str = Field(description="generator family: 'transformer', 'gan', 'diffusers' (any diffusers pipeline; "
                        "pip install 'promptmill[diffusers]') or an installed plugin's (entry-point group "
                        "promptmill.generators)")
    checkpoint: CheckpointRef = Field(description="path, fsspec URL, or shipped:NAME for one that comes with "
                                      "promptmill. Our families: a directory with config.json + model.safetensors; "
                                      "diffusers: a pipeline directory (model_index.json + one folder per component, "
                                      "safetensors weights; copied once per node into the local cache); a plugin's: "
                                      "what its loader reads")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the checkpoint URL")
    images_per_prompt: int = Field(default=1, ge=1, le=1000, description="samples per accepted prompt")
    sampling: dict[str, Any] = Field(default_factory=dict, description="family-specific sampling parameters (over "
                                     "the checkpoint's recommended ones, its config.json sampling, key by key; null "
                                     "turns an optional one off; each image records what it was drawn with), plus "
                                     "best-of-K, which the job handles for every family: candidates: K draws K per "
                                     "image and keeps the best by rerank_by: clip_score (the default), prompt_match "
                                     "(the judge's verdict; families that draw the shapes domain) or aesthetic_score "
                                     "(with scoring.aesthetic); ties go to clip_score (to prompt_match for "
                                     "clip_score, when there is a judge), then to the earliest draw")
    resources: Resources = Field(default_factory=Resources, description="actor pool and batch size")
    precision: Precision | None = Field(default=None, description="fp32, bf16 or fp16; unset: the family's default. "
                                        "Our families: fp32, and bf16 / fp16 run generate under torch autocast "
                                        "(weights stay as loaded). diffusers: the weights' dtype, default fp16 on "
                                        "CUDA and fp32 on CPU (bf16 runs on CPU too). Scorers stay fp32. Changes "
                                        "the pixels, so a rerun into the same output must keep it")
    sizes: dict[str, str] = Field(default_factory=dict, description="named sizes (aspect presets) rows may ask for "
                                  "through input.size_column, e.g. {'1:1': 1024x1024, '16:9': 1344x768}; diffusers "
                                  "only")
    loras: list[LoraSpec] = Field(default_factory=list, max_length=16, description="LoRA adapters loaded with the "
                                  "pipeline's own LoRA loader (diffusers only); their content joins the checkpoint's "
                                  "identity, so a resume with other adapters is refused")
    variant: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="diffusers only: "
                                "the weight files' variant to load (e.g. fp16: unet/diffusion_pytorch_model."
                                "fp16.safetensors)")

    @field_validator("family")
    @classmethod
    def _installed(cls, v: str) -> str:
        families = installed_families()
        if v not in families:
            raise ValueError(f"{v!r} is not an installed generator family; installed: {families} (a family is a "
                             "package with an entry point in 'promptmill.generators')")
        return v

    @field_validator("sampling")
    @classmethod
    def _candidates(cls, v: dict[str, Any]) -> dict[str, Any]:
        k = v.get("candidates", 1)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= 256:
            raise ValueError(f"candidates must be an integer in [1, 256], got {k!r}")
        return v

    @model_validator(mode="after")
    def _diffusers_options(self) -> ModelSpec:
        if self.variant is not None and self.family != "diffusers":
            raise ValueError(f"variant: a diffusers option (weight file variants); family {self.family!r} has none")
        if self.loras and self.family != "diffusers":
            raise ValueError(f"loras: adapters load through diffusers' LoRA loader; family {self.family!r} has none")
        if self.sizes and self.family not in SIZED_FAMILIES:
            raise ValueError(f"sizes: family {self.family!r} draws one size; per-row sizes need {SIZED_FAMILIES}")
        for name, size in self.sizes.items():
            if parse_size(size) is None:
                raise ValueError(f"sizes[{name!r}]: {size!r} is not WIDTHxHEIGHT with each a multiple of 8 in "
                                 "[8, 4096]")
        return self

    @model_validator(mode="after")
    def _rerank_by(self) -> ModelSpec:
        by = self.sampling.get("rerank_by", "clip_score")
        if by not in RERANK_BY:
            raise ValueError(f"model {self.name!r}: sampling.rerank_by {by!r} is not a score best-of-K can order "
                             f"candidates by; choose one of {list(RERANK_BY)}")
        if by == "prompt_match" and self.family not in JUDGED_FAMILIES:
            raise ValueError(f"model {self.name!r}: sampling.rerank_by 'prompt_match' is the shapes judge's verdict, "
                             f"meaningless for family {self.family!r} (families {list(JUDGED_FAMILIES)} draw its "
                             "domain); use clip_score or aesthetic_score")
        return self

    @model_validator(mode="after")
    def _candidates_per_call(self) -> ModelSpec:
        if self.candidates * self.resources.batch_size > MAX_IMAGES_PER_CALL:
            raise ValueError(f"sampling.candidates x resources.batch_size = {self.candidates} x "
                             f"{self.resources.batch_size} images in one generate call; at most {MAX_IMAGES_PER_CALL}")
        return self

    @property
    def candidates(self) -> int:
        """Rerank: draw this many per image, keep the best by `rerank_by` (handled by the job, not the family)."""
        return self.sampling.get("candidates", 1)

    @property
    def rerank_by(self) -> str | None:
        """The score best-of-K keeps the highest of; None when one image is drawn (nothing is chosen)."""
        return self.sampling.get("rerank_by", "clip_score") if self.candidates > 1 else None

    @property
    def pixel_sampling(self) -> dict[str, Any]:
        """`sampling` as what decides the pixels: rerank_by only where it chooses and is not the default, so a spec
        that spells the default out (or sets it at K = 1) matches an output written without it."""
        return {k: v for k, v in self.sampling.items()
                if k != "rerank_by" or self.rerank_by not in (None, "clip_score")}

    @property
    def precision_record(self) -> dict[str, str]:
        """`precision` as the fingerprint and each row's sampling record it: nothing for fp32, so outputs written
        before the field existed still match."""
        record = {} if self.precision in (None, "fp32") else {"precision": self.precision}
        return {**record, **({"variant": self.variant} if self.variant else {}),
                **({"loras": [{"weight": x.weight, "weight_name": x.weight_name} for x in self.loras]} if self.loras
                   else {})}

    @property
    def family_sampling(self) -> dict[str, Any]:
        return {k: v for k, v in self.sampling.items() if k not in RERANK_KEYS}


class ScoringSpec(Strict):
    enabled: bool = Field(default=True, description="false leaves clip_score / prompt_match / judged null")
    clip: CheckpointRef | None = Field(default=str(SHIPPED / "clip"), description="CLIP checkpoint for clip_score and "
                             "rerank; null: no clip_score")
    judge: CheckpointRef | None = Field(default=str(SHIPPED / "judge"), description="judge checkpoint for prompt_match and "
                              "judged attributes; null: none")
    aesthetic: CheckpointRef | None = Field(default=None, description="a LAION-style aesthetic predictor on the CLIP's "
                                            "image embeddings (config.json + model.safetensors; models/aesthetic.py "
                                            "says how to convert LAION's): aesthetic_score per image; null: none")
    clip_near_duplicate_distance: float = Field(default=0.02, ge=0, le=2, description="without a judge: two samples of "
                                                "a prompt closer than this in CLIP image-embedding cosine distance are "
                                                "near-duplicates (calibrate yours: benchmarks/near_duplicates.py)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the scorers' URLs")
    pool: bool | None = Field(default=None, description="true: a scoring actor pool of its own, sized by "
                              "scoring.resources (scoring overlaps generation; scorers on other hardware than the "
                              "generators); false: each generator actor also scores every batch it draws, on its own "
                              "device (one pool fewer); null: a pool when the cluster's CPUs allow one, else false")
    resources: Resources = Field(default_factory=lambda: Resources(batch_size=64),
                                 description="the scoring actor pool, with pool: true (like a model's); its batch is "
                                 "also the write batch, so a crash redoes at most that many images per block in "
                                 "flight; `promptmill score` always uses it")

    @field_validator("resources")
    @classmethod
    def _one_call(cls, v: Resources) -> Resources:
        if v.concurrent_calls is not None:
            raise ValueError("concurrent_calls is a generator pool's (models[*].resources); a scoring actor runs one "
                             "batch at a time")
        return v


class MetricsSpec(Strict):
    reference: str | None = Field(default=None, description="image-caption Parquet (e.g. the shapes test split) "
                                  "for FID / KID / IS / precision-recall at the end of the job; null: skipped")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the reference")
    image_column: str = Field(default="png", description="image bytes column of the reference")
    max_images: int = Field(default=2000, ge=10, le=100_000, description="reference images read (and run images per model)")


C2PA_ALGORITHMS = ("es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519")  # c2pa-python's C2paSigningAlg


def _not_pem(v: str) -> str:
    if "-----BEGIN" in v:
        raise ValueError("a PEM written into the spec; give a path or URL to the file, or ${NAME} of an environment "
                         "variable holding it (the spec is copied into summaries and Ray's job records)")
    return v


PemRef = Annotated[str, AfterValidator(_not_pem)]


class C2paSpec(Strict):
    certificate: PemRef = Field(description="the signing certificate chain (PEM, leaf first, then intermediates): a "
                                "path or fsspec URL, or ${NAME}: an environment variable holding the PEM or its path, "
                                "read where the images are written (every node). Never the PEM itself")
    private_key: PemRef = Field(description="the certificate's private key (PEM, PKCS#8), given like certificate; "
                                "read once per worker process, never written or logged")
    algorithm: Literal[C2PA_ALGORITHMS] = Field(default="es256", description="signature algorithm, matching the "  # type: ignore[valid-type]
                                                "key: es256/384/512 (EC P-256/384/521), ps256/384/512 (RSA-PSS), ed25519")
    tsa_url: str | None = Field(default=None, description="an RFC 3161 timestamp authority: a verifier then accepts "
                                "the signature after the certificate expires; null: no timestamp")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the certificate "
                                            "and key URLs")


class OutputSpec(Strict):
    path: str = Field(description="output directory; local path or any fsspec URL")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="passed to fsspec for the output")
    image_format: ImageFormat = Field(default="png", description="encoding of image files")
    format: OutputFormat = Field(
        default="files", description="files: one object per image; webdataset: tar shards; parquet: bytes in the metadata")
    write_in: Literal["auto", "actors", "tasks"] = Field(
        default="auto", description="files layout: where images are encoded and written. actors: in the job's last "
        "actor stage (no pixels cross the object store; best where CPUs are few); tasks: in write tasks of their own, "
        "one per generated batch, in parallel over the cluster's CPUs (a fast GPU model outdraws what its one actor "
        "process can encode); auto: tasks when any model runs on GPUs, else actors. WebDataset and Parquet always "
        "write in tasks of shard_size rows")
    shard_size: int = Field(default=1000, ge=1, le=100_000, description="webdataset and parquet: samples per write "
                            "batch, per WebDataset shard (a batch holding two models' images makes one shard each) or "
                            "metadata part (files: one part per generated batch)")
    report: bool = Field(default=True, description="write report.html at the end of the job")
    nsfw: Literal["reject", "flag"] = Field(default="reject", description="an image the pipeline's safety checker "
                                            "flags (its pixels are black): reject sends the row to rejected/ with "
                                            "reason nsfw; flag keeps it with nsfw = true in the metadata")
    max_error_fraction: float = Field(default=0.01, ge=0, le=1, description="rows a model raises on (alone, "
                                      "twice) go to rejected/ as generation_error; more than this share of the "
                                      "images fails the job")
    lease_wait_s: float = Field(default=0, ge=0, le=86_400, description="a run whose output another live run is "
                                "writing waits this long for it, then stops naming it (one writer per output)")
    lease_ttl_s: float = Field(default=60, ge=2, le=3600, description="the output lease lasts this long unless renewed "
                               "(every third of it); a run stalled longer loses it to the next run and commits nothing")
    provenance: bool = Field(default=True, description="embed prompt, model, checkpoint id, seed and the IPTC "
                             "'trainedAlgorithmicMedia' (AI-generated) marker in each image file (PNG text chunks, "
                             "XMP); off: pixels only")
    sidecars: bool = Field(default=False, description="files layout: also write <id>-<sample>.txt (the prompt) and "
                           ".json (the metadata row) beside each image, as img2dataset does")
    shared: bool = Field(default=False, description="a local path that every node of the cluster mounts (NFS, EFS, "
                         "Lustre): allowed on a multi-node cluster, where an unshared local path is refused")
    c2pa: C2paSpec | None = Field(default=None, description="sign each image with a C2PA manifest (c2pa-python; "
                                  "pip install 'promptmill[c2pa]'): created by an AI tool (IPTC trainedAlgorithmicMedia), "
                                  "prompt, model, checkpoint id and seed, signed with the team's certificate; PNG, JPEG, "
                                  "WebP; null: off")


class RetrySpec(Strict):
    attempts: int = Field(default=10, ge=1, le=100, description="tries per storage call, the first included")
    max_wait_s: float = Field(default=120, ge=0, le=3600, description="seconds of backoff per call at most; the "
                              "defaults wait out an outage of at least ~65 s (backoff doubles from 1 s to 20 s, "
                              "half of each step jittered)")


class StorageSpec(Strict):
    retry: RetrySpec = Field(default_factory=RetrySpec, description="transient storage errors (connection "
                             "refused/reset, timeouts, 5xx, SlowDown, throttling) are retried with backoff; "
                             "permanent ones (403, missing bucket, bad credentials) fail at once")


class MlflowSpec(Strict):
    uri: str = Field(description="tracking URI: http(s)://server, databricks, or sqlite:///path/mlflow.db for a local "
                     "store (MLflow 3.18 refuses a file:/ store unless MLFLOW_ALLOW_FILE_STORE=true)")
    experiment: str = Field(default="promptmill", description="experiment name, created when missing")
    run_name: str | None = Field(default=None, description="the tracker run's name; null: the job's name")
    artifact_location: str | None = Field(default=None, description="where a new experiment keeps artifacts (histogram, "
                                          "sample grid, summary.json); null: mlartifacts/ beside a sqlite:/// database, "
                                          "else the tracking server's default")
    timeout_s: float = Field(default=20, gt=0, le=600, description="per HTTP request to the server, two retries at most: "
                             "a tracker that is down costs the job about this much, then the run is logged without it")


class WandbSpec(Strict):
    project: str = Field(description="W&B project")
    entity: str | None = Field(default=None, description="W&B team or user; null: the API key's default")
    mode: Literal["online", "offline", "disabled"] = Field(default="online", description="offline: written under dir "
                                                           "for `wandb sync` later; disabled: nothing logged")
    dir: str | None = Field(default=None, description="local folder of W&B's run files; null: WANDB_DIR or ./wandb")
    run_name: str | None = Field(default=None, description="the tracker run's name; null: the job's name")
    timeout_s: float = Field(default=60, gt=0, le=600, description="wandb.init's timeout (init_timeout)")


class TrackingSpec(Strict):
    mlflow: MlflowSpec | None = Field(default=None, description="log each run to MLflow (pip install "
                                      "'promptmill[mlflow]'); a URI string is short for {uri: ...}")
    wandb: WandbSpec | None = Field(default=None, description="log each run to Weights & Biases (pip install "
                                    "'promptmill[wandb]')")

    @field_validator("mlflow", mode="before")
    @classmethod
    def _uri_shorthand(cls, v: Any) -> Any:
        return {"uri": v} if isinstance(v, str) else v


class JobSpec(Strict):
    name: str = Field(description="job name, recorded in the summary")
    seed: int = Field(default=0, description="job seed; per-image seeds derive from (seed, id, model, sample)")
    input: InputSpec = Field(description="where the prompts come from")
    models: list[ModelSpec] = Field(min_length=1, description="every accepted prompt goes to every model")
    output: OutputSpec = Field(description="where images, metadata and the summary go")
    scoring: ScoringSpec = Field(default_factory=ScoringSpec, description="per-image scores and rerank")
    metrics: MetricsSpec = Field(default_factory=MetricsSpec, description="job-level metrics against a reference")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="how storage calls ride through faults")
    tracking: TrackingSpec = Field(default_factory=TrackingSpec, description="experiment trackers the driver logs "
                                   "each run to after it is committed (parameters, per-model figures, histogram, sample "
                                   "grid); one that fails is named in summary.json (tracking_error), never fails the job")

    @model_validator(mode="after")
    def _unique_models(self) -> JobSpec:
        names = [m.name for m in self.models]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"model names must be unique; repeated: {dup}")
        if self.metrics.reference and not (self.scoring.judge or self.scoring.clip):
            raise ValueError("metrics.reference needs scoring.judge or scoring.clip (the feature space of the metrics)")
        if self.scoring.aesthetic and not self.scoring.clip:
            raise ValueError("scoring.aesthetic needs scoring.clip (it reads the CLIP's image embeddings)")
        for column, what in ((self.input.size_column, "size_column"), (self.input.negative_prompt_column,
                                                                        "negative_prompt_column")):
            takes = [m.name for m in self.models if m.family not in SIZED_FAMILIES]
            if column and takes:
                raise ValueError(f"input.{what}: models {takes} cannot take a per-row value (families "
                                 f"{SIZED_FAMILIES} can); run them in a spec without it")
        for m in self.models:
            if m.candidates > 1 and not (self.scoring.enabled and self.scoring.clip):
                raise ValueError(f"model {m.name!r}: sampling.candidates > 1 reranks by {m.rerank_by} with ties to "
                                 "clip_score, which needs scoring.enabled and scoring.clip")
            needs = {"prompt_match": "judge", "aesthetic_score": "aesthetic"}.get(m.rerank_by)
            if needs and getattr(self.scoring, needs) is None:
                raise ValueError(f"model {m.name!r}: sampling.rerank_by {m.rerank_by!r} needs scoring.{needs}, "
                                 "which is null")
        return self


def _format(e: ValidationError, source: str) -> str:
    lines = [f"invalid spec {source}:"]
    for err in e.errors():
        loc = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in err["loc"]).replace(".[", "[")
        got = repr(redact(err.get("input")))
        got = got if len(got) <= 200 else got[:200] + "..."  # a spec-level error's input is the whole spec
        lines.append(f"  {loc or '<root>'}: {err['msg']} (got {got})")
    return "\n".join(lines)


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set `a.b.0.c` in nested dicts/lists; list indices are integers."""
    keys = dotted.split(".")
    node: Any = data
    for i, k in enumerate(keys[:-1]):
        nxt_is_index = keys[i + 1].isdigit()
        if isinstance(node, list):
            node = node[int(k)]
        else:
            node = node.setdefault(k, [] if nxt_is_index else {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_value(text: str) -> Any:
    """A command-line value as YAML, so `3`, `true`, `null`, `[1, 2]` keep their type; except that YAML 1.1
    reads "1e-4" as a string: a float is what anyone typing it means (a run failed on it at its first step)."""
    if not text.strip():
        return ""
    v = yaml.safe_load(text)
    return float(v) if isinstance(v, str) and _EXPONENT.fullmatch(v.strip()) else v


def parse_overrides(items: list[str], flag: str = "--set") -> list[tuple[str, Any]]:
    """`key=value` pairs from the command line, values typed by `parse_value`."""
    out = []
    for item in items:
        if "=" not in item:
            raise SpecError(f"{flag} expects key=value, got {item!r}")
        k, v = item.split("=", 1)
        out.append((k.strip(), parse_value(v)))
    return out


# the local paths a spec file holds; they resolve against the file's folder (as in a compose file or a Makefile),
# so a spec means the same from any working directory. `--set` values are the shell's: the working directory's.
# Training recipes are not in here: `make checkpoints` runs them from the project root, which is what they say.
LATE_REFS = ("output.c2pa.certificate", "output.c2pa.private_key")  # paths whose ${NAME} stays as written
SPEC_PATHS = {
    "spec": ("input.path", "output.path", "models.*.checkpoint", "models.*.loras.*.path", "scoring.clip",
             "scoring.judge", "scoring.aesthetic", "metrics.reference", *LATE_REFS),
    "schedule": ("catalog.path", "output.prefix", "models.*.checkpoint", "models.*.loras.*.path", "scoring.clip",
                 "scoring.judge", "scoring.aesthetic", "metrics.reference", "deliver.to"),
}


def _relative_local(v: Any) -> bool:
    return (isinstance(v, str) and bool(v) and "://" not in v and not os.path.isabs(v)
            and not v.startswith((SHIPPED_REF, "~", "${")))


def rewrite_paths(data: dict, fields: tuple[str, ...], fn: Callable[[Any], Any]) -> None:
    """In place: the value at each dotted field ('*' = every list item) becomes fn(value)."""
    def walk(node: Any, keys: list[str]) -> None:
        if keys[0] == "*":
            items = list(enumerate(node)) if isinstance(node, list) else []
        else:
            items = [(keys[0], node[keys[0]])] if isinstance(node, dict) and keys[0] in node else []
        for key, child in items:
            if len(keys) > 1:
                walk(child, keys[1:])
            else:
                node[key] = fn(child)

    for field in fields:
        walk(data, field.split("."))


def spec_data(source: str | Path | dict, overrides: list[str] | None = None, kind: str = "spec") -> tuple[dict, str]:
    """(data with `--set` overrides applied, its name for messages); SpecError on an unreadable file or bad path.
    A file's relative paths (`SPEC_PATHS`) become absolute against its folder."""
    if isinstance(source, dict):
        data, name = copy.deepcopy(source), "<dict>"
    else:
        name = str(source)
        try:
            data = yaml.safe_load(Path(source).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise SpecError(f"cannot read {kind} {name}: {e}") from e
        if not isinstance(data, dict):
            raise SpecError(f"{kind} {name} must be a YAML mapping, got {type(data).__name__}")
        base = Path(source).resolve().parent
        rewrite_paths(data, SPEC_PATHS.get(kind, ()),
                      lambda v: os.path.normpath(os.path.join(base, v)) if _relative_local(v) else v)
    for k, v in parse_overrides(overrides or []):
        try:
            set_path(data, k, v)
        except (IndexError, ValueError, TypeError, AttributeError) as e:
            raise SpecError(f"--set {k}: no such field path ({e})") from e
    return data, name


def validated(model: type[BaseModel], data: dict, name: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise SpecError(_format(e, name)) from None


def load_spec(source: str | Path | dict, overrides: list[str] | None = None) -> JobSpec:
    """The spec to run here: `${ENV_VAR}` references resolved from this process's environment."""
    data, name = spec_data(source, overrides)
    return validated(JobSpec, resolve_env(data), name)


def resolve_env(data: Any, environ: Mapping[str, str] | None = None, where: str = "",
                placeholder: str | None = None, kind: str = "spec", _path: tuple[str, ...] = ()) -> Any:
    """Copy of `data` with `${NAME}` replaced by the variable's value in the fields that say where data lives and
    how to reach it: every `storage_options` mapping and the path fields of `SPEC_PATHS[kind]`. Secrets stay out
    of spec files and out of what `promptmill submit` sends (they resolve on the cluster); any other string keeps
    its `${...}` as written (a prompt or a template may say ${price}). A missing variable is a SpecError naming
    the field; each value put into storage options is redacted wherever it would be written or logged (a path's
    value is where the data is: outputs name it). `placeholder`: put that in
    for every reference (to validate a spec elsewhere)."""
    env = os.environ if environ is None else environ
    if isinstance(data, dict):
        return {k: resolve_env(v, env, f"{where}.{k}" if where else str(k), placeholder, kind, (*_path, str(k)))
                for k, v in data.items()}
    if isinstance(data, list):
        return [resolve_env(v, env, f"{where}[{i}]", placeholder, kind, (*_path, str(i))) for i, v in enumerate(data)]
    if isinstance(data, str) and _resolvable(_path, kind):
        def value(m: re.Match) -> str:
            if placeholder is not None:
                return placeholder
            if m[1] not in env:
                raise SpecError(f"{where}: ${{{m[1]}}} is not set in this environment")
            if "storage_options" in _path:  # credentials; a path is a location
                remember_secret(env[m[1]])
            return env[m[1]]
        return ENV_REF.sub(value, data)
    return data


def _resolvable(path: tuple[str, ...], kind: str) -> bool:
    """Whether a field (its keys and list indices) takes `${NAME}`: storage options and path fields only."""
    if "storage_options" in path:
        return True
    if ".".join(path) in LATE_REFS:  # the signing key's ${NAME} is read where it signs, never put into the spec
        return False
    return any(len(f := field.split(".")) == len(path) and all(k == p or (p == "*" and k.isdigit())
                                                             for k, p in zip(path, f))
               for field in SPEC_PATHS.get(kind, ()))


def _type_name(ann: Any) -> str:
    if get_origin(ann) is Literal:
        return " | ".join(repr(a) for a in get_args(ann))
    if get_origin(ann) is Annotated:  # CheckpointRef: the validator is not part of the type a user writes
        return _type_name(get_args(ann)[0])
    if get_origin(ann) in (Union, UnionType):
        return " | ".join("None" if a is NoneType else _type_name(a) for a in get_args(ann))
    return ann.__name__ if isinstance(ann, type) else str(ann).replace("typing.", "").replace("promptmill.pipelines.spec.", "")


def reference(model: type[BaseModel] | None = None, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(field path, type, default, description) of every field of the job spec, nested models flattened:
    the spec reference (`promptmill spec`, docs/spec.md) is generated from the same Field descriptions."""
    model = model or JobSpec
    rows = []
    for name, f in model.model_fields.items():
        path = f"{prefix}{name}"
        ann = f.annotation
        nested = next((a for a in (ann, *getattr(ann, "__args__", ()))
                       if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if f.is_required():
            default = "required"
        elif f.default_factory is not None:
            made = f.default_factory()
            default = "" if isinstance(made, BaseModel) else repr(made)
        else:
            default = repr(f.default)
        is_list = get_origin(ann) is list
        rows.append((path, _type_name(ann), default.replace(str(SHIPPED), "<shipped checkpoints>"), f.description or ""))
        if nested:
            rows += reference(nested, f"{path}[*]." if is_list else f"{path}.")
    return rows


def reference_markdown() -> str:
    lines = ["# Job spec reference", "",
             "Generated from the pydantic field descriptions in `pipelines/spec.py` by `promptmill spec --markdown`",
             "(`make spec-docs`); a test fails when this file and the code disagree.", "",
             "| field | type | default | description |", "|---|---|---|---|"]
    for path, kind, default, desc in reference():
        cell = lambda t: t.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| `{path}` | {cell(kind)} | {cell(default)} | {cell(desc)} |")
    return "\n".join(lines) + "\n"
