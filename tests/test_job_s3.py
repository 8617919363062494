"""The generate job against S3 (a moto server on loopback, s3fs): prompts from S3, outputs to S3, read back."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import s3fs
from conftest import make_spec
from promptmill.models.images import decode_image
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.spec import load_spec


def test_s3_in_s3_out(ray_local, checkpoints, s3):
    fs = s3fs.S3FileSystem(**s3)
    table = pa.table({"id": ["a", "b", "c"], "prompt": ["a red circle", "a green square, top", "  "]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.pipe("bucket/prompts/part-0.parquet", buf.getvalue())
    spec = make_spec("s3://bucket/prompts/", "s3://bucket/runs/one", checkpoints)
    spec["input"]["storage_options"] = s3
    spec["output"]["storage_options"] = s3
    res = run_job(load_spec(spec))
    assert res.images_written == {"gan": 4} and res.rejected == {"empty_prompt": 1}
    assert fs.exists("bucket/runs/one/_SUCCESS")
    files = fs.find("bucket/runs/one/metadata")
    rows = pa.concat_tables([pq.read_table(io.BytesIO(fs.cat_file(f))) for f in files]).to_pylist()
    assert sorted((r["id"], r["sample"]) for r in rows) == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]
    for r in rows:
        assert r["image_path"].startswith("images/gan/")  # relative to the output
        img = decode_image(fs.cat_file(f"bucket/runs/one/{r['image_path']}"))
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    rejected = pq.read_table(io.BytesIO(fs.cat_file(fs.find("bucket/runs/one/rejected")[0]))).to_pylist()
    assert rejected == [{"id": "c", "prompt": "  ", "reason": "empty_prompt"}]
    summary = json.loads(fs.cat_file("bucket/runs/one/summary.json"))
    assert summary["spec"]["output"]["storage_options"]["secret"] == "***"
    assert summary["spec"]["output"]["storage_options"]["endpoint_url"] == s3["endpoint_url"]
    # rerun against S3: nothing to do, nothing rewritten
    assert run_job(load_spec(spec)).skipped
    assert fs.find("bucket/runs/one/metadata") == files and not fs.exists("bucket/runs/one/_staging")
