"""Outputs as Hugging Face `datasets` loads them, after the output folder moved: paths relative to the output root,
the files layout's imagefolder table, the Parquet layout's Image feature; and older outputs (absolute URLs, plain
image bytes) still resume exactly once and read back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_spec, write_prompts
from promptmill.pipelines.batch.imagefolder import DROPPED
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.layout import IMAGEFOLDER, METADATA_SCHEMA, PATHS, PATHS_KEY
from promptmill.pipelines.runs.results import Run
from promptmill.pipelines.spec import load_spec

datasets = pytest.importorskip("datasets")
PIL = pytest.importorskip("PIL.Image")

PROMPTS = ["a small red circle on the left", "a large blue square above a green triangle", "big yellow triangle, top"]
IDS, SKUS = ["p0", "p.1", "p2"], ["SKU-0", "SKU-1", "SKU-2"]


def _run(tmp_path: Path, out: Path, fmt: str, checkpoints, n: int = 2):
    write_prompts(tmp_path / "in" / "part-0.parquet", PROMPTS, IDS, sku=SKUS)
    spec = make_spec(str(tmp_path / "in"), str(out), checkpoints, output={"path": str(out), "format": fmt})
    spec["models"][0]["images_per_prompt"] = n
    spec["input"]["keep_columns"] = ["sku"]
    spec["scoring"] = {"enabled": False}
    return run_job(load_spec(spec))


@pytest.fixture
def hf(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return lambda *a, **k: datasets.load_dataset(*a, split="train", **k)


def _same_pixels(images: list, reference: list[np.ndarray]) -> bool:
    return all(np.array_equal(np.asarray(im.convert("RGB")), ref) for im, ref in zip(images, reference))


@pytest.mark.parametrize("fmt", ["files", "parquet", "webdataset"])
def test_each_layout_loads_in_datasets_with_pil_images_and_every_column_after_a_move(
        ray_local, checkpoints, tmp_path, hf, fmt):
    out, moved = tmp_path / "out", tmp_path / "elsewhere" / "copy"
    _run(tmp_path, out, fmt, checkpoints)
    moved.parent.mkdir()
    shutil.move(out, moved)
    run = Run(str(moved))  # our reader resolves the relative paths against the new root
    meta = pq.read_table(moved / "metadata")
    rows = meta.sort_by([("id", "ascending"), ("sample", "ascending")]).to_pylist()
    assert len(rows) == 6 and pq.read_schema(next((moved / "metadata").glob("*.parquet"))).metadata[PATHS_KEY] == \
        PATHS.encode()
    assert json.loads((moved / "summary.json").read_text())["image_path"] == PATHS
    shown = run.rows("gan")
    want = dict(zip(zip(shown["id"].to_pylist(), shown["sample"].to_pylist()), run.images(shown)))
    columns = set(METADATA_SCHEMA.names) | {"sku"}
    if fmt == "files":
        assert all(not r["image_path"].startswith("/") and (moved / r["image_path"]).is_file() for r in rows)
        lines = [json.loads(s) for s in (moved / "images" / "gan" / IMAGEFOLDER).read_text().splitlines()]
        assert len(lines) == 6 and all((moved / "images" / "gan" / x["file_name"]).is_file() for x in lines)
        ds = hf("imagefolder", data_dir=str(moved / "images" / "gan"))
        assert set(ds.column_names) == columns - set(DROPPED) | {"image"}  # file_name becomes the image
    elif fmt == "parquet":
        ds = hf("parquet", data_files=str(moved / "metadata" / "*.parquet"))
        assert set(ds.column_names) == columns and isinstance(ds.features["image"], datasets.Image)
    else:
        assert all(r["image_path"].startswith("shards/gan/") and (moved / r["image_path"]).is_file() for r in rows)
        ds = hf("webdataset", data_files=str(moved / "shards" / "gan" / "*.tar"))
        assert set(ds.column_names) == {"__key__", "__url__", "png", "txt", "json"}
        assert set(ds[0]["json"]) == columns - {"image", "image_path"}
        ds = ds.map(lambda r: {**r["json"], "image": r["png"]}, remove_columns=["json", "png"])
    got = sorted(ds, key=lambda r: (r["id"], r["sample"]))
    assert [(r["id"], r["sample"], r["prompt"], r["sku"]) for r in got] == \
        [(r["id"], r["sample"], r["prompt"], r["sku"]) for r in rows]
    assert all(isinstance(r["image"], PIL.Image) and r["image"].size == (32, 32) for r in got)
    assert _same_pixels([r["image"] for r in got], [want[(r["id"], r["sample"])] for r in got])


def _age(out: Path) -> None:
    """Rewrite the committed metadata as a run from before relative paths wrote it: absolute image paths, the image
    as plain bytes, no schema metadata; the imagefolder table removed."""
    for f in (out / "metadata").glob("*.parquet"):
        t = pq.read_table(f)
        paths = [None if p is None else str(out / p) for p in t["image_path"].to_pylist()]
        image = pa.array([None if v is None else v["bytes"] for v in t["image"].to_pylist()], pa.binary())
        t = t.set_column(t.schema.get_field_index("image_path"), "image_path", pa.array(paths, pa.string()))
        t = t.set_column(t.schema.get_field_index("image"), "image", image).replace_schema_metadata(None)
        pq.write_table(t, f)
    (out / "images" / "gan" / IMAGEFOLDER).unlink(missing_ok=True)


@pytest.mark.parametrize("fmt", ["files", "parquet", "webdataset"])
def test_an_older_output_resumes_exactly_once_and_reads_back(ray_local, checkpoints, tmp_path, fmt):
    out = tmp_path / "out"
    _run(tmp_path, out, fmt, checkpoints, n=1)
    _age(out)
    old = {(r["id"], r["sample"]): r for r in pq.read_table(out / "metadata").to_pylist()}
    result = _run(tmp_path, out, fmt, checkpoints, n=2)
    assert sum(result.images_written.values()) == 3  # only the new samples
    rows = pq.read_table(out / "metadata").to_pylist()
    keys = [(r["id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == 6
    for r in rows:  # old rows as they were written; new ones relative (parquet: bytes become the Image struct)
        if (r["id"], r["sample"]) in old:
            assert r["image_path"] == old[(r["id"], r["sample"])]["image_path"]
        elif fmt != "parquet":
            assert not r["image_path"].startswith("/")
        if fmt == "parquet":
            assert r["image_path"] is None and r["image"]["bytes"]
    if fmt == "webdataset":  # the new shard is numbered after the old one, which is kept
        assert sorted(p.name for p in (out / "shards" / "gan").glob("*.tar")) == ["00000.tar", "00001.tar"]
    if fmt == "files":  # the imagefolder table lists old and new images, relative to its folder
        lines = [json.loads(s) for s in (out / "images" / "gan" / IMAGEFOLDER).read_text().splitlines()]
        assert len(lines) == 6 and all((out / "images" / "gan" / x["file_name"]).is_file() for x in lines)
    run = Run(str(out))
    images = run.images(run.rows("gan"))
    assert len(images) == 6 and all(im.shape == (32, 32, 3) for im in images)


def test_score_reads_a_datasets_image_column(ray_local, tmp_path, capsys):
    """`promptmill score` over a Parquet file `datasets` wrote with an Image column (struct of bytes and path, as
    our Parquet layout now writes): every row decodes and is scored, none gets a score_error."""
    from promptmill.jobs.cli import main

    rng = np.random.default_rng(0)
    images = [PIL.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(4)]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    (tmp_path / "in").mkdir()
    datasets.Dataset.from_dict({"image": images, "caption": PROMPTS + PROMPTS[:1]}, features=features).to_parquet(
        str(tmp_path / "in" / "hf.parquet"))
    assert pa.types.is_struct(pq.read_schema(tmp_path / "in" / "hf.parquet").field("image").type)
    assert main(["score", str(tmp_path / "in"), "--out", str(tmp_path / "scored"), "--image-column", "image"]) == 0
    rows = pq.read_table(tmp_path / "scored" / "parts").to_pylist()
    assert len(rows) == 4 and all(r["score_error"] is None and r["clip_score"] is not None for r in rows)
