"""Incremental inputs: files added to an input folder are drawn by the next run of the same spec (their rows only);
a changed or removed file is reported (log and summary.json), never redrawn; the manifest beside the output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_spec, write_prompts
from promptmill.pipelines.batch.inputs import input_changes, record
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.batch.read import plan_input, read_prompts
from promptmill.pipelines.layout import INPUTS
from promptmill.pipelines.spec import InputSpec, load_spec


def _digests(out: Path) -> dict[str, bytes]:
    return {r["image_path"]: (out / r["image_path"]).read_bytes() for r in pq.read_table(out / "metadata").to_pylist()}


def test_new_files_are_drawn_and_changed_or_removed_ones_reported_never_redrawn(ray_local, checkpoints, tmp_path,
                                                                                 caplog):
    inp, out = tmp_path / "in", tmp_path / "out"
    write_prompts(inp / "a.parquet", ["a red circle", "a blue square"], ["a0", "a1"])
    spec = load_spec(make_spec(str(inp), str(out), checkpoints))
    first = run_job(spec)
    manifest = json.loads((out / INPUTS).read_text())["files"]
    assert [(Path(f["url"]).name, f["rows"]) for f in manifest] == [("a.parquet", 2)]
    assert manifest[0]["size"] == (inp / "a.parquet").stat().st_size and manifest[0]["fingerprint"]
    assert first.images_written == {"gan": 4}
    # a new file under the prefix: only its rows are drawn
    write_prompts(inp / "b.parquet", ["a green triangle"], ["b0"])
    before = _digests(out)
    second = run_job(spec)
    assert second.images_written == {"gan": 2} and second.summary["input_changes"] == {"added": [str(inp / "b.parquet")]}
    assert {k: v for k, v in _digests(out).items() if k in before} == before
    # a's prompts rewritten in place, b removed: both named, nothing redrawn, the rerun stays a no-op otherwise
    write_prompts(inp / "a.parquet", ["a purple diamond", "a blue square", "a new row"], ["a0", "a1", "a2"])
    os.remove(inp / "b.parquet")
    before = _digests(out)
    with caplog.at_level("WARNING", logger="promptmill.pipelines.batch.inputs"):
        third = run_job(spec)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "a.parquet" in warned and "changed" in warned and "b.parquet" in warned and "no longer" in warned
    assert third.images_written == {"gan": 2}  # a2 only: a0's new prompt is not drawn again
    changes = json.loads((out / "summary.json").read_text())["input_changes"]
    assert changes == {"changed": [str(inp / "a.parquet")], "removed": [str(inp / "b.parquet")]}
    assert {k: v for k, v in _digests(out).items() if k in before} == before
    rows = {(r["id"], r["sample"]): r["prompt"] for r in pq.read_table(out / "metadata").to_pylist()}
    assert rows[("a0", 0)] == "a red circle" and len(rows) == 8  # as drawn; b0's images stay too


def test_the_manifest_on_s3_fingerprints_by_etag(s3, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    write_prompts(tmp_path / "a.parquet", ["p"] * 3, ["x", "y", "z"])
    write_prompts(tmp_path / "b.parquet", ["p"] * 2, ["v", "w"])
    fs.put(str(tmp_path / "a.parquet"), "bucket/manifest/in/a.parquet")
    fs.put(str(tmp_path / "b.parquet"), "bucket/manifest/in/b.parquet")
    spec = InputSpec(path="s3://bucket/manifest/in/", id_column="id", storage_options=s3)
    plan = plan_input(spec)
    assert [(f.url, f.rows) for f in plan.found] == [("s3://bucket/manifest/in/a.parquet", 3),
                                                    ("s3://bucket/manifest/in/b.parquet", 2)]
    assert all(f.fingerprint.strip('"') for f in plan.found)  # the ETag
    record(fs, "bucket/manifest/out", plan)
    assert input_changes(fs, "bucket/manifest/out", plan_input(spec)) == {}
    write_prompts(tmp_path / "a.parquet", ["q"] * 3, ["x", "y", "z"])  # same rows, other bytes
    fs.put(str(tmp_path / "a.parquet"), "bucket/manifest/in/a.parquet")
    fs.rm("bucket/manifest/in/b.parquet")
    fs.put(str(tmp_path / "b.parquet"), "bucket/manifest/in/c.parquet")
    fs.invalidate_cache()
    assert input_changes(fs, "bucket/manifest/out", plan_input(spec)) == {
        "added": ["s3://bucket/manifest/in/c.parquet"], "changed": ["s3://bucket/manifest/in/a.parquet"],
        "removed": ["s3://bucket/manifest/in/b.parquet"]}


def test_a_text_input_past_the_limit_records_no_row_count(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.csv").write_text("id,prompt\n" + "".join(f"r{i},p\n" for i in range(5)))
    (tmp_path / "in" / "b.csv").write_text("id,prompt\nq,p\n")
    plan = plan_input(InputSpec(path=str(tmp_path / "in"), id_column="id", limit=3))
    assert [(Path(f.url).name, f.rows) for f in plan.found] == [("a.csv", None), ("b.csv", None)]
    assert input_changes(fsspec.filesystem("file"), str(tmp_path / "none"), plan) == {}


def _spoil_row_groups(path: Path, first: int) -> None:
    """Overwrite every column chunk of row groups `first`.. with 0xFF, the footer kept: reading them fails."""
    md = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for g in range(first, md.num_row_groups):
        for c in range(md.num_columns):
            cc = md.row_group(g).column(c)
            start = cc.dictionary_page_offset if cc.has_dictionary_page else cc.data_page_offset
            data[start:start + cc.total_compressed_size] = b"\xff" * cc.total_compressed_size
    path.write_bytes(bytes(data))


def test_limit_reads_no_row_group_or_text_block_past_the_limit(ray_local, tmp_path):
    """The file `limit` ends in is read up to the row group (Parquet) or parse block (text) holding its last row:
    what lies past it is spoiled here, and the limited read never meets it while a full read does."""
    write_prompts(tmp_path / "pq" / "a.parquet", [f"a{i}" for i in range(5)], [f"a{i}" for i in range(5)])
    b = tmp_path / "pq" / "b.parquet"
    pq.write_table(pa.table({"id": [f"b{i}" for i in range(100)], "prompt": [f"p{i}" for i in range(100)]}), b,
                   row_group_size=10)
    _spoil_row_groups(b, 2)  # rows 20..99
    spec = InputSpec(path=str(tmp_path / "pq"), id_column="id", limit=5 + 15)
    plan = plan_input(spec)
    assert plan.rows == 20 and plan.duplicate_ids == set()  # the duplicate-id count reads the same rows
    got = sorted(r["id"] for r in read_prompts(plan, spec).take_all())
    assert got == sorted([f"a{i}" for i in range(5)] + [f"b{i}" for i in range(15)])
    whole = InputSpec(path=str(tmp_path / "pq"), id_column="id")
    with pytest.raises(Exception, match="b.parquet|Parquet|parquet|thrift|Thrift"):
        read_prompts(plan_input(whole), whole).take_all()

    text = tmp_path / "csv" / "a.csv"
    text.parent.mkdir()
    good = "".join(f"r{i},a red circle number {i}\n" for i in range(60_000))  # ~2 MB: several parse blocks
    text.write_text("id,prompt\n" + good + "bad,one,two\n")
    spec = InputSpec(path=str(text), id_column="id", limit=5)
    assert [r["id"] for r in read_prompts(plan_input(spec), spec).take_all()] == [f"r{i}" for i in range(5)]
    whole = InputSpec(path=str(text), id_column="id")
    with pytest.raises(Exception, match="a.csv: line 60002: expected 2 fields"):
        plan_input(whole)
