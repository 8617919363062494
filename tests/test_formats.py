"""The three output layouts (files, webdataset, parquet), read back by independent readers, with resume
and exactly-once kept, on local disk and on a moto S3."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from conftest import make_spec, write_prompts
from promptmill.models.images import decode_image
from promptmill.pipelines.batch.commit import commit, done_keys
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.layout import METADATA_SCHEMA, sample_member_key, tar_bytes
from promptmill.pipelines.runs.results import Run
from promptmill.pipelines.spec import load_spec
from promptmill.pipelines.storage import filesystem

PROMPTS = ["a small red circle on the left", "a large blue square above a green triangle", "big yellow triangle, top",
           "a purple diamond in the center", "a tiny white square, bottom"]
IDS = ["p0", "p.1", "p2", "p3", "p4"]  # a dot in an id must not split a WebDataset key


SKUS, PRICES = [f"SKU-{i}" for i in range(5)], [9.5, 10.0, None, 3.25, 1.0]  # an ad catalog's columns
CATALOG = dict(zip(IDS, zip(SKUS, PRICES)))


def _spec(tmp_path: Path, out: str, fmt: str, checkpoints, n: int = 2, keep: bool = False, **output) -> dict:
    write_prompts(tmp_path / "in" / "part-0.parquet", PROMPTS, IDS, sku=SKUS, price=PRICES)
    spec = make_spec(str(tmp_path / "in"), out, checkpoints, output={"path": out, "format": fmt, "shard_size": 4, **output})
    spec["models"][0]["images_per_prompt"] = n
    spec["scoring"] = {"enabled": False}
    if keep:
        spec["input"]["keep_columns"] = ["sku", "price"]
    return spec


def _load_dataset(tmp_path: Path, monkeypatch, builder: str, files: str):
    """Hugging Face `datasets`, offline, as a user loads an img2dataset output."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return datasets.load_dataset(builder, data_files=files, split="train")


def _wds_samples(urls: list[str]) -> list[dict]:
    return list(wds.WebDataset(urls, shardshuffle=False))


def _tar_digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "shards" / "gan").glob("*.tar")}


def test_webdataset_read_back_resume_and_rerun(ray_local, checkpoints, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run_job(load_spec(_spec(tmp_path, str(out), "webdataset", checkpoints, keep=True)))
    shards = sorted((out / "shards" / "gan").glob("*.tar"))
    assert [p.name for p in shards] == [f"{i:05d}.tar" for i in range(len(shards))]
    samples = _wds_samples([str(p) for p in shards])
    keys = [s["__key__"] for s in samples]
    assert len(keys) == len(set(keys)) == 10
    by_key = {s["__key__"]: s for s in samples}
    rows = pq.read_table(out / "metadata").to_pylist()
    assert len(rows) == 10 and all(r["image"] is None and r["image_key"] in by_key for r in rows)
    for r in rows:
        s = by_key[r["image_key"]]
        assert s["txt"].decode() == r["prompt"]
        meta = json.loads(s["json"])
        assert (meta["id"], meta["sample"], meta["seed"]) == (r["id"], r["sample"], r["seed"])
        assert meta["sha256"] == r["sha256"] == hashlib.sha256(s["png"]).hexdigest()
        assert (r["sku"], r["price"]) == (meta["sku"], meta["price"]) == CATALOG[r["id"]]  # input.keep_columns
        assert decode_image(s["png"]).shape == (32, 32, 3)
        assert r["image_path"].endswith(".tar") and (out / r["image_path"]).is_file()  # relative to the output
    hf = _load_dataset(tmp_path, monkeypatch, "webdataset", str(out / "shards" / "gan" / "*.tar"))
    assert hf.num_rows == 10 and hf[0]["png"].size == (32, 32) and hf[0]["json"]["sku"] in SKUS
    # rerun: nothing changes; more samples per prompt: only new shards, old bytes kept
    before = _tar_digests(out)
    assert run_job(load_spec(_spec(tmp_path, str(out), "webdataset", checkpoints, keep=True))).skipped
    assert _tar_digests(out) == before
    run_job(load_spec(_spec(tmp_path, str(out), "webdataset", checkpoints, n=3, keep=True)))
    after = _tar_digests(out)
    assert {k: after[k] for k in before} == before and len(after) > len(before)
    samples = _wds_samples([str(p) for p in sorted((out / "shards" / "gan").glob("*.tar"))])
    assert len(samples) == len({s["__key__"] for s in samples}) == 15


def test_parquet_and_files_layouts_carry_the_same_bytes_provenance_catalog_columns_and_load_in_datasets(
        ray_local, checkpoints, tmp_path, monkeypatch):
    """img2dataset parity and provenance on one pair of runs: the parquet layout holds the files layout's bytes;
    each file says what made it and that it is AI-generated; input.keep_columns ride along (and in the files
    layout's .txt/.json sidecars); Hugging Face `datasets` loads both."""
    from PIL import Image
    from promptmill.pipelines.layout import encode_image
    from promptmill.pipelines.provenance import TRAINED_ALGORITHMIC_MEDIA, read_fields

    out = tmp_path / "out"
    files = tmp_path / "files"
    run_job(load_spec(_spec(tmp_path, str(out), "parquet", checkpoints, keep=True)))
    run_job(load_spec(_spec(tmp_path, str(files), "files", checkpoints, keep=True, sidecars=True)))
    t = pq.read_table(out / "metadata")
    assert t.num_rows == 10 and not (out / "images").exists()
    file_rows = pq.read_table(files / "metadata").to_pylist()
    ref = {(r["id"], r["sample"]): (files / r["image_path"]).read_bytes() for r in file_rows}
    for r in t.to_pylist():
        assert r["image"]["bytes"] == ref[(r["id"], r["sample"])]  # same bytes as the files layout
        assert r["sha256"] == hashlib.sha256(r["image"]["bytes"]).hexdigest()
        assert (r["sku"], r["price"]) == CATALOG[r["id"]]
    for r in file_rows:
        data = (files / r["image_path"]).read_bytes()
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        im = Image.open(io.BytesIO(data))
        fields = read_fields(im)
        assert fields["prompt"] == r["prompt"] and fields["checkpoint_id"] == r["checkpoint_id"] is not None
        assert (fields["model"], fields["seed"], fields["sample"]) == (r["model"], str(r["seed"]), str(r["sample"]))
        assert f'DigitalSourceType="{TRAINED_ALGORITHMIC_MEDIA}"' in im.text["XML:com.adobe.xmp"]
        stem = str(files / r["image_path"]).rsplit(".", 1)[0]
        side = json.loads(Path(f"{stem}.json").read_text())
        assert Path(f"{stem}.txt").read_text() == r["prompt"] and (side["id"], side["sku"]) == (r["id"], r["sku"])
    bare = Image.open(io.BytesIO(encode_image(decode_image(data), "png")))  # output.provenance: false
    assert not read_fields(bare) and "XML:com.adobe.xmp" not in bare.text
    summary = json.loads((files / "summary.json").read_text())
    assert "GenerateStage" in summary["ray_data_stats"]  # Ray Data's per-operator stats of the run
    hf = _load_dataset(tmp_path, monkeypatch, "parquet", str(out / "metadata" / "*.parquet"))
    assert hf.num_rows == 10 and all(np.asarray(im).shape == (32, 32, 3) for im in hf["image"])  # PIL, decoded
    hf = _load_dataset(tmp_path, monkeypatch, "parquet", str(files / "metadata" / "*.parquet"))
    assert sorted(hf["sku"]) == sorted(SKUS * 2) and all((files / p).is_file() for p in hf["image_path"])
    assert run_job(load_spec(_spec(tmp_path, str(out), "parquet", checkpoints, keep=True))).skipped
    for run_dir in (out, files):  # report and evaluate read every row without image bytes or judge features
        run = Run(str(run_dir))
        assert not {"image", "judge_features"} & set(run.metadata.column_names) and len(run.metadata) == 10
        rows = run.rows("gan").slice(1, 3)  # the images of just these rows, fetched by key in either layout
        want = [decode_image(ref[k]) for k in zip(rows.column("id").to_pylist(), rows.column("sample").to_pylist())]
        assert np.array_equal(np.stack(run.images(rows)), np.stack(want))


def test_files_written_in_tasks_are_the_actors_bytes_exactly_once(ray_local, checkpoints, tmp_path):
    """output.write_in: tasks (the default beside a GPU model) writes what the actors' write does, byte for byte,
    exactly once, from write tasks of its own."""
    from test_job import assert_exactly_once

    runs = {}
    for where in ("actors", "tasks"):
        out = tmp_path / where
        run_job(load_spec(_spec(tmp_path, str(out), "files", checkpoints, write_in=where)))
        rows = assert_exactly_once(out, {("gan", i, s) for i in IDS for s in (0, 1)})
        runs[where] = {(r["id"], r["sample"]): (r["sha256"], (out / r["image_path"]).read_bytes()) for r in rows}
        stats = json.loads((out / "summary.json").read_text())["ray_data_stats"]
        assert ("MapBatches(WriteStage)" in stats) == (where == "tasks"), stats[:2000]
    assert runs["tasks"] == runs["actors"]


@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_write_tasks_retry_a_bounded_number_of_times(ray_local, tmp_path, fmt):
    """Ray Data retries a task whose worker died without limit; the job's write tasks stop at MAX_TASK_RETRIES, as
    its actor pools do, so a write that kills its worker every time fails the job instead of hanging it."""
    import ray
    from promptmill.pipelines.batch.job import write_tasks
    from promptmill.pipelines.batch.pools import MAX_TASK_RETRIES

    class KillsItsWorker:  # defined here: Ray's workers get it by value, not by importing this test module
        """A write stage whose every attempt kills the worker running it (as an OOM kill would), after noting
        the attempt in a file."""

        def __init__(self, attempts: str) -> None:
            self.attempts = attempts

        def __call__(self, batch):
            with open(self.attempts, "a") as f:
                f.write(f"{os.getpid()}\n")
            os._exit(1)

    spec = load_spec(make_spec("in", str(tmp_path / "out"), {"gan": "ck"},
                               output={"path": str(tmp_path / "out"), "format": fmt, "shard_size": 7}))
    attempts = tmp_path / "attempts"
    ds = write_tasks(ray.data.range(3, override_num_blocks=1), KillsItsWorker(str(attempts)), spec.output)
    assert ds._logical_plan.dag.batch_size == (None if fmt == "files" else 7)  # a task per batch, or shard_size rows
    t0 = time.time()
    with pytest.raises(ray.exceptions.RayError):
        ds.take_all()
    assert time.time() - t0 < 300, "the failing write hung the job"  # a hang guard, no speed claim
    pids = attempts.read_text().split()
    assert len(pids) == MAX_TASK_RETRIES + 1 and len(set(pids)) == len(pids), pids  # one try per new worker
    assert MAX_TASK_RETRIES >= 1  # bounded, and retried at all


def test_changing_the_format_of_an_output_is_refused(ray_local, checkpoints, tmp_path):
    from promptmill.pipelines.batch.job import PreflightError

    out = str(tmp_path / "out")
    run_job(load_spec(_spec(tmp_path, out, "parquet", checkpoints)))
    with pytest.raises(PreflightError, match="format"):
        run_job(load_spec(_spec(tmp_path, out, "webdataset", checkpoints)))


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_sharded_formats_on_s3(ray_local, checkpoints, tmp_path, s3, fmt):
    out = f"s3://bucket/{fmt}"
    spec = _spec(tmp_path, out, fmt, checkpoints, storage_options=s3)
    run_job(load_spec(spec))
    fs, root = filesystem(out, s3)
    t = pq.read_table(io.BytesIO(fs.cat_file(fs.find(f"{root}/metadata")[0])))
    assert t.num_rows == 10
    if fmt == "webdataset":
        local = []
        for u in sorted(fs.glob(f"{root}/shards/gan/*.tar")):
            local.append(str(tmp_path / u.rsplit("/", 1)[-1]))
            fs.get(u, local[-1])
        samples = _wds_samples(local)
        assert len(samples) == len({s["__key__"] for s in samples}) == 10
    else:
        assert all(decode_image(b["bytes"]).shape == (32, 32, 3) for b in t.column("image").to_pylist())
    assert run_job(load_spec(spec)).skipped


@pytest.mark.parametrize("bucket_bytes", [None, 1])
def test_commit_drops_a_shard_written_twice_and_rewrites_a_partial_one(tmp_path, monkeypatch, bucket_bytes):
    """Ray may run a write batch twice: two staged tars hold the same samples. With one-byte buckets each sample
    is deduplicated in its own bucket, and the tars' fate still follows the run's first row of each."""
    import promptmill.pipelines.batch.commit as c
    import pyarrow as pa

    if bucket_bytes:
        monkeypatch.setattr(c, "BUCKET_BYTES", bucket_bytes)
    fs, root = filesystem(str(tmp_path))
    staged = tmp_path / "_staging"

    def stage(name: str, ids: list[str]) -> None:
        members = [(f"{sample_member_key(i, 0)}.png", i.encode()) for i in ids]
        path = staged / "shards" / "gan" / f"{name}.tar"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tar_bytes(members))
        cols = {f.name: [None] * len(ids) for f in METADATA_SCHEMA}
        cols.update(id=ids, model=["gan"] * len(ids), sample=[0] * len(ids), image_format=["png"] * len(ids),
                    image_key=[sample_member_key(i, 0) for i in ids], image_path=[str(path)] * len(ids))
        (staged / "metadata").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table(cols, schema=METADATA_SCHEMA), staged / "metadata" / f"{name}.parquet")

    stage("a", ["x", "y"])
    stage("b", ["x", "y"])  # the same batch, run twice
    stage("c", ["y", "z"])  # overlaps: must lose y
    assert done_keys(fs, root) == {"gan/x/0", "gan/y/0", "gan/z/0"}
    table = commit(fs, root)
    assert table.num_rows == 3
    shards = sorted((tmp_path / "shards" / "gan").glob("*.tar"))
    members = [m for p in shards for m in tarfile.open(p).getnames()]
    assert sorted(members) == ["x_0.png", "y_0.png", "z_0.png"]
    assert not staged.joinpath("shards").exists()


def test_keep_columns_are_checked_before_any_work(checkpoints, tmp_path):
    from promptmill.pipelines.batch.preflight import PreflightError, preflight
    from promptmill.pipelines.spec import SpecError

    write_prompts(tmp_path / "in" / "part-0.parquet", PROMPTS, IDS, sku=list("abcde"))
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints)
    spec["input"]["keep_columns"] = ["sku", "campaign"]
    with pytest.raises(PreflightError, match=r"part-0.parquet: missing input.keep_columns \['campaign'\]"):
        preflight(load_spec(spec))
    spec["input"]["keep_columns"] = ["sku", "seed"]
    with pytest.raises(SpecError, match=r"input.keep_columns.*\['seed'\] are columns promptmill writes itself"):
        load_spec(spec)
