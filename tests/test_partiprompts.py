"""1,632 real benchmark prompts (PartiPrompts) through a tiny GAN: every input row is accounted for."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_spec
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.spec import load_spec

TSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "PartiPrompts.tsv"


@pytest.mark.skipif(not TSV.exists(), reason="../shared/data/PartiPrompts.tsv not present")
def test_partiprompts_every_row_accounted_for(ray_local, checkpoints, tmp_path):
    with TSV.open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert len(rows) == 1632
    pq.write_table(pa.table({"prompt": [r["Prompt"] for r in rows], "category": [r["Category"] for r in rows],
                             "challenge": [r["Challenge"] for r in rows]}), tmp_path / "parti.parquet")
    spec = make_spec(str(tmp_path / "parti.parquet"), str(tmp_path / "out"), checkpoints)
    spec["input"].update(id_column=None, max_prompt_chars=300)
    spec["models"][0].update(images_per_prompt=1, resources={"batch_size": 64})
    res = run_job(load_spec(spec))
    meta = pq.read_table(tmp_path / "out" / "metadata").to_pylist()
    rejected = pq.read_table(tmp_path / "out" / "rejected").to_pylist() if (tmp_path / "out" / "rejected").exists() else []
    assert len(meta) + len(rejected) == 1632 == res.input_rows
    assert len({r["id"] for r in meta} | {r["row_id"] for r in rejected}) == 1632  # derived ids are unique
    assert all(r["reason"] == "prompt_too_long" and len(r["prompt"]) > 300 for r in rejected)
    long = sum(len(r["Prompt"]) > 300 for r in rows)
    assert len(rejected) == long
    by_prompt = {r["id"]: r["prompt"] for r in meta}
    assert set(by_prompt.values()) == {r["Prompt"] for r in rows if len(r["Prompt"]) <= 300}  # text survives as is
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["accepted"] == len(meta) and summary["images_total"] == {"gan": len(meta)}
