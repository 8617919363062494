"""CSV, TSV and JSON Lines inputs (`pipelines.text_tables`): through the job's reader and validation like Parquet,
compressed or not, local and on S3; a malformed line is a preflight error naming the file and the line."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_spec
from promptmill.pipelines.batch.job import run_job, validated_prompts
from promptmill.pipelines.batch.read import plan_input
from promptmill.pipelines.spec import load_spec
from promptmill.pipelines.tables import InputError

ROWS = [("007", "a small red circle on the left", "SKU-0"), ("p1", "a large blue square,\nabove a green triangle", "SKU-1"),
        ("p2", "", "SKU-2"), ("p3", "big yellow triangle, top", "SKU-3")]  # p2: empty prompt, rejected


def _csv(rows: list[tuple], sep: str = ",") -> bytes:
    quote = (lambda v: '"' + v.replace('"', '""') + '"') if sep == "," else (lambda v: v.replace("\n", " "))
    return ("".join(sep.join(quote(v) for v in r) + "\n" for r in [("id", "prompt", "sku"), *rows])).encode()


def _jsonl(rows: list[tuple]) -> bytes:
    return "".join(json.dumps(dict(zip(("id", "prompt", "sku"), r))) + "\n" for r in rows).encode()


def _zstd(data: bytes) -> bytes:
    buf = pa.BufferOutputStream()
    with pa.CompressedOutputStream(buf, "zstd") as out:
        out.write(data)
    return buf.getvalue().to_pybytes()


COMPRESS = {"": lambda b: b, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": _zstd}


def _write(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(COMPRESS.get("." + name.rsplit(".", 1)[1], COMPRESS[""])(data))
    return path


@pytest.mark.parametrize("layout", [
    {"prompts.csv": _csv(ROWS)},
    {"prompts.tsv.gz": _csv(ROWS, "\t")},
    {"a.jsonl": _jsonl(ROWS[:2]), "b.jsonl.gz": _jsonl(ROWS[2:])},  # a folder: plain and gzip, in name order
], ids=["csv", "tsv.gz", "jsonl-folder"])
def test_text_inputs_run_through_the_job_with_rejected_rows_and_kept_columns(ray_local, checkpoints, tmp_path, layout):
    for name, data in layout.items():
        _write(tmp_path / "in", name, data)
    src = str(tmp_path / "in" / next(iter(layout))) if len(layout) == 1 else str(tmp_path / "in")
    spec = make_spec(src, str(tmp_path / "out"), checkpoints, scoring={"enabled": False})
    spec["models"][0]["images_per_prompt"] = 1
    spec["input"]["keep_columns"] = ["sku"]
    result = run_job(load_spec(spec))
    assert (result.input_rows, result.rejected) == (4, {"empty_prompt": 1})
    rows = {r["id"]: r for r in pq.read_table(tmp_path / "out" / "metadata").to_pylist()}
    assert sorted(rows) == ["007", "p1", "p3"]  # "007" stays text: CSV columns are not type-guessed
    assert rows["p1"]["prompt"] == (ROWS[1][1] if ".tsv" not in src else ROWS[1][1].replace("\n", " "))
    assert {i: r["sku"] for i, r in rows.items()} == {"007": "SKU-0", "p1": "SKU-1", "p3": "SKU-3"}
    rejected = pq.read_table(tmp_path / "out" / "rejected").to_pylist()
    assert [(r["id"], r["reason"], r["sku"]) for r in rejected] == [("p2", "empty_prompt", "SKU-2")]


@pytest.mark.parametrize("name, data, where", [
    ("bad.csv", b"id,prompt\np0,ok\np1,one,two\n", "line 3: expected 2 fields (the header's), found 3"),
    ("bad.tsv.gz", b"id\tprompt\np0\tok\np1\n", "line 3: expected 2 fields (the header's), found 1"),
    ("bad.jsonl", b'{"id": "p0", "prompt": "ok"}\n{"id": "p1", "prompt": "cut\n', "line 2: not valid JSON"),
    ("bad.jsonl.xz", b'{"id": "p0", "prompt": "ok"}\n["p1"]\n', "line 2: a JSON Lines row must be an object"),
    ("bad.csv.bz2", b"id,prompt\np0,ok\np1,caf\xe9\n", "line 3: not valid UTF-8"),
    ("bad.jsonl.zst", b'{"id": "p0", "prompt": "ok"}\n{"id": "p1", "prompt": "caf\xe9"}\n', "line 2: not valid UTF-8"),
])
def test_a_malformed_line_exits_2_naming_the_file_and_line(tmp_path, checkpoints, capsys, name, data, where):
    from promptmill.jobs.cli import main

    path = _write(tmp_path / "in", name, data)
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(make_spec(str(path), str(tmp_path / "out"), checkpoints)))
    assert main(["generate", str(spec_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: {where}" in err, err
    assert not (tmp_path / "out").exists()


def test_formats_mixed_in_one_folder_and_columns_are_refused(tmp_path, checkpoints):
    from promptmill.pipelines.spec import InputSpec

    _write(tmp_path / "in", "a.csv", _csv(ROWS))
    _write(tmp_path / "in", "b.jsonl", _jsonl(ROWS))
    with pytest.raises(InputError, match=r"mixes table formats: .*a\.csv \(csv\), .*b\.jsonl \(jsonl\)"):
        plan_input(InputSpec(path=str(tmp_path / "in"), id_column="id"))
    plan = plan_input(InputSpec(path=str(tmp_path / "in"), id_column="id", format="jsonl"))  # explicit: one kind
    assert (plan.format, plan.rows, [Path(f).name for f in plan.files]) == ("jsonl", 4, ["b.jsonl"])
    with pytest.raises(InputError, match=r"a\.csv: missing prompt column 'text'"):
        plan_input(InputSpec(path=str(tmp_path / "in" / "a.csv"), prompt_column="text"))
    _write(tmp_path / "dup", "d.csv", _csv([ROWS[0], ROWS[0], ROWS[3]]))
    assert plan_input(InputSpec(path=str(tmp_path / "dup"), id_column="id")).duplicate_ids == {"007"}


def test_jsonl_zstd_on_s3_derived_ids_and_limit(ray_local, checkpoints, tmp_path, s3):
    """s3fs through fsspec (AWS_ENDPOINT_URL-style options), zstd, ids derived from file + row (stable between
    reads), `input.limit` as the first rows in file order across two files."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3)
    fs.pipe({"bucket/in/a.jsonl.zst": _zstd(_jsonl(ROWS[:2])), "bucket/in/b.jsonl.gz": gzip.compress(_jsonl(ROWS[2:]))})
    spec = make_spec("s3://bucket/in/", "s3://bucket/out/", checkpoints)
    spec["input"] = {"path": "s3://bucket/in/", "storage_options": s3, "limit": 3}
    spec = load_spec(spec)
    plan = plan_input(spec.input)
    assert (plan.format, plan.rows, plan.head[1]) == ("jsonl", 3, 1)

    def read() -> list[dict]:  # in file order (blocks of several files arrive in any order)
        rows = [{k: r[k] for k in ("pm_id", "prompt", "pm_reason")} for r in validated_prompts(plan, spec).take_all()]
        return sorted(rows, key=lambda r: [x[1] for x in ROWS].index(r["prompt"]))

    first = read()
    assert [r["prompt"] for r in first] == [r[1] for r in ROWS[:3]]
    assert [r["pm_reason"] for r in first] == [None, None, "empty_prompt"]
    assert read() == first and len({r["pm_id"] for r in first}) == 3
