"""The output layout, in one place: file names, sample keys, image paths, the metadata schema, formats.

Everything that reads or writes a run imports these; a second spelling of a key or a path is how
exactly-once breaks silently (resume would not recognise a sample it already wrote).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import uuid

import numpy as np
import pyarrow as pa
from PIL import Image

# files of a run, relative to its root
STAGING, METADATA, REJECTED, SHARDS, IMAGES = "_staging", "metadata", "rejected", "shards", "images"
SUCCESS, SUMMARY, SPEC, REPORT, LEASE = "_SUCCESS", "summary.json", "_spec.json", "report.html", "_lease.json"
INPUTS = "_inputs.json"  # the input manifest: the files the output was drawn from (`pipelines.batch.inputs`)

# a job's, a model's or a row id's name becomes part of output paths: letters, digits, '.', '_', '-', no leading dot
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # always fullmatch: `$` lets "ok\n" through
OUTPUT_FORMATS = ("files", "webdataset", "parquet")  # img2dataset's three
# image format -> (file extension, Pillow save arguments); the one list every spec and writer uses
IMAGE_FORMATS: dict[str, tuple[str, dict]] = {
    "png": ("png", {"format": "PNG"}),
    "jpeg": ("jpg", {"format": "JPEG", "quality": 95}),
    "webp": ("webp", {"format": "WEBP", "lossless": True}),
}


# the Parquet layout's image: Hugging Face `datasets`' Image feature (its arrow storage), so `load_dataset("parquet")`
# decodes it; `path` is the image's file name, for the format
IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
METADATA_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("model", pa.string()), ("family", pa.string()),
    ("checkpoint", pa.string()), ("sample", pa.int32()), ("seed", pa.int64()), ("image_path", pa.string()),
    ("image_key", pa.string()), ("width", pa.int32()), ("height", pa.int32()), ("image_format", pa.string()),
    ("sampling", pa.string()), ("device", pa.string()), ("node", pa.string()), ("clip_score", pa.float64()),
    ("prompt_match", pa.bool_()),
    ("judged", pa.string()), ("candidates", pa.int32()), ("candidate_index", pa.int32()),
    ("candidate_score", pa.float64()), ("image", IMAGE_TYPE), ("pipeline_class", pa.string()),
    ("geometry", pa.string()), ("judge_features", pa.list_(pa.float32())), ("diversity", pa.float32()),
    ("near_duplicate", pa.bool_()), ("scoring_error", pa.string()), ("checkpoint_id", pa.string()),
    ("sha256", pa.string()), ("nsfw", pa.bool_()), ("prompt_truncated", pa.bool_()), ("negative_prompt", pa.string()),
    ("clip_features", pa.list_(pa.float32())), ("aesthetic_score", pa.float64()), ("rerank_by", pa.string()),
])
# null when the job does not score
SCORES = ("clip_score", "prompt_match", "judged", "geometry", "judge_features", "scoring_error", "clip_features",
          "aesthetic_score")
DERIVED = ("diversity", "near_duplicate")  # per prompt, across its samples: set when the metadata is committed
# per image, from the generate stage (null where a model cannot tell or has none): its safety checker's flag, a
# prompt cut to the text encoder's token limit, the row's negative prompt
PER_IMAGE = ("nsfw", "prompt_truncated", "negative_prompt")
# best-of-K: `candidates` drawn, `candidate_index` kept, `candidate_score` its score by `rerank_by`, the chooser (null
# at K = 1). Rows written before the column hold null there: their chooser was clip_score, the only one then
# (`chooser_of`).
RERANK_DEFAULT = "clip_score"


def chooser_of(candidates: int | None, rerank_by: str | None) -> str | None:
    """The chooser that kept a row's image: None when it was the only draw; an older row's null is clip_score."""
    return None if (candidates or 1) <= 1 else rerank_by or RERANK_DEFAULT


# where image_path (files: the image; webdataset: its shard) points: relative to the run's root, so an output can be
# moved or copied; rows of runs from before this hold absolute URLs, which readers still take (`run_path`)
PATHS = "relative to the output root (the folder holding metadata/); older rows: absolute URLs"
PATHS_KEY = b"promptmill.image_path"  # the committed metadata's schema metadata says so, as does summary.json
HF_KEY = b"huggingface"  # `datasets`' own key: {"info": {"features": ...}} (datasets.Features.arrow_schema)
IMAGEFOLDER = "metadata.jsonl"  # `load_dataset("imagefolder")`'s table beside a files-layout model's images
HF_VALUES = {"string": "string", "large_string": "large_string", "int32": "int32", "int64": "int64", "bool": "bool",
             "double": "float64", "float": "float32", "binary": "binary", "large_binary": "large_binary",
             "null": "null", "int8": "int8", "int16": "int16", "uint64": "uint64", "uint32": "uint32"}


def run_path(root: str, path: str) -> str:
    """A metadata path as a path of the run's filesystem (protocol stripped): relative ones (`PATHS`) under `root`;
    an older run's absolute URL or path as written (the caller's `inside_run` decides whether it may be read)."""
    if "://" in path or path.startswith("/"):
        return path.split("://", 1)[-1] if "://" in path else path
    return f"{root.rstrip('/')}/{path}"


def _hf_feature(t: pa.DataType) -> dict | None:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _hf_feature(t.value_type)
        return None if inner is None else {"feature": inner, "_type": "List"}
    return {"dtype": HF_VALUES[str(t)], "_type": "Value"} if str(t) in HF_VALUES else None


def dataset_schema(schema: pa.Schema) -> pa.Schema:
    """`schema` with what readers need to know beyond the types: where paths point (PATHS_KEY), and the Hugging Face
    features (the image as their Image) so `datasets` decodes images; left to `datasets` to infer when a column
    (an exotic input.keep_columns type) has no plain feature."""
    features = {f.name: {"_type": "Image"} if f.name == "image" else _hf_feature(f.type) for f in schema}
    meta = {PATHS_KEY: PATHS.encode()}
    if all(v is not None for v in features.values()):
        meta[HF_KEY] = json.dumps({"info": {"features": features}}).encode()
    return schema.with_metadata(meta)


def extension(image_format: str) -> str:
    return IMAGE_FORMATS[image_format][0]


def encode_image(img: np.ndarray, fmt: str, provenance: dict[str, str] | None = None) -> bytes:
    """uint8 (H, W, 3) -> encoded bytes in one of IMAGE_FORMATS; `provenance` fields are embedded in the file
    (`pipelines.provenance`: text chunks / XMP and the AI-generated marker)."""
    from promptmill.pipelines.provenance import save_arguments

    buf = io.BytesIO()
    extra = save_arguments(fmt, provenance) if provenance else {}
    Image.fromarray(img, "RGB").save(buf, **IMAGE_FORMATS[fmt][1], **extra)
    return buf.getvalue()


def sample_key(row_id: str, model: str, sample: int) -> str:
    """The identity of one image in a run: resume skips it, commit keeps one row for it."""
    return f"{model}/{row_id}/{sample}"


def sample_keys(table: pa.Table) -> list[str]:
    """`sample_key` of every metadata row, in row order."""
    cols = (table.column(c).to_pylist() for c in ("id", "model", "sample"))
    return [sample_key(i, m, int(s)) for i, m, s in zip(*cols)]


def image_relpath(model: str, row_id: str, sample: int, image_format: str) -> str:
    """images/<model>/<3 hex>/<id>-<sample>.<ext>: 4,096 prefixes keep folders under ~10k objects up to ~40M images."""
    shard = hashlib.blake2b(row_id.encode(), digest_size=2).hexdigest()[:3]
    return f"{IMAGES}/{model}/{shard}/{row_id}-{sample}.{extension(image_format)}"


def shard_relpath(model: str, number: int) -> str:
    return f"{SHARDS}/{model}/{number:05d}.tar"


def staged_part_name(token: str, suffix: str = ".parquet") -> str:
    """A staged part's file name: the writing run's fencing token (`pipelines.batch.lease`), then a unique id."""
    return f"{token}~{uuid.uuid4().hex}{suffix}" if token else f"{uuid.uuid4().hex}{suffix}"


def part_token(path: str) -> str | None:
    """The fencing token in a staged part's name (None for a part written without one)."""
    name = path.rsplit("/", 1)[-1]
    return name.split("~", 1)[0] if "~" in name else None


def rejected_name(number: int) -> str:
    return f"part-{number:05d}.parquet"


# what a run may delete, by name: its own shards and rejected parts, under its own root, nothing else
OWN_SHARD = re.compile(rf"{SHARDS}/{SAFE_NAME.pattern}/\d{{5,}}\.tar")
OWN_REJECTED = re.compile(r"part-\d{5,}\.parquet")


def own_shard(root: str, path: str) -> bool:
    """Whether `path` (a filesystem path, protocol stripped) is one of our shards directly under `root`."""
    rel = path[len(root) + 1:] if path.startswith(root.rstrip("/") + "/") else None
    return rel is not None and OWN_SHARD.fullmatch(rel) is not None


def sample_member_key(row_id: str, sample: int) -> str:
    """WebDataset key (everything before the first dot of a member name): ids may hold dots, '%' never."""
    return f"{row_id.replace('.', '%2E')}_{sample}"


def member_key(name: str) -> str:
    """The sample key of a tar member name (`<key>.<ext>`)."""
    return name.rsplit("/", 1)[-1].split(".", 1)[0]


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """Deterministic tar (fixed mtime/owner), members in the given order. PAX, not USTAR: USTAR names stop at
    100 characters and a 128-character id (valid) made every write of its shard fail, run after run."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MAX_MEMBER_BYTES = 256 * 2**20  # no image or sidecar of ours comes near; a tar claiming more is not ours


def tar_members(data: bytes) -> list[tuple[str, bytes]]:
    """(name, bytes) of the files in a tar, in order: the inverse of `tar_bytes`. Only plain members within
    MAX_MEMBER_BYTES and the tar's own length are read: a sparse member (GNU sparse maps) inflates a few KB of
    tar into any size, and links or devices have no bytes of ours. Anything else is a ValueError naming it."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for m in tar.getmembers():
            if m.isdir():
                continue
            if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE) or m.issparse():
                raise ValueError(f"tar member {m.name!r} is not a plain file (type {m.type!r}); refused")
            if m.size > min(MAX_MEMBER_BYTES, len(data)):
                raise ValueError(f"tar member {m.name!r} claims {m.size} bytes in a {len(data)}-byte tar; refused")
            out.append((m.name, tar.extractfile(m).read()))
    return out
