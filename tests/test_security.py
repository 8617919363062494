"""Safety findings of issue 14, one test each: hostile or broken inputs, secrets, other people's data, one writer.

Each test failed on the code before its fix (the finding's reproduction, kept as a test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_spec, write_prompts

from jobs.cli import main
from pipelines.batch.job import run_job
from pipelines.spec import SpecError, load_spec


def _cli(spec: dict, tmp_path: Path, *args: str) -> int:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return main(["generate", str(p), *args])


# ---------------------------------------------------------------- 10-13: hostile or broken inputs

@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_a_128_character_id_writes_in_every_format(ray_local, checkpoints, tmp_path, fmt):
    """USTAR tar names stop at 100 characters: a valid 128-character id failed every WebDataset write."""
    long_id = "x" * 128
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", "a blue square"], [long_id, "short"])
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints, output={"path": str(tmp_path / "out"),
                                                                                      "format": fmt})
    res = run_job(load_spec(spec))
    assert res.images_total == {"gan": 4}
    from pipelines.runs.results import Run

    run = Run(str(tmp_path / "out"))
    rows = run.rows("gan")
    assert sorted(set(rows.column("id").to_pylist())) == ["short", long_id]
    assert run.images(rows).shape == (4, 32, 32, 3)  # every image reads back, the long id's included


def test_names_that_end_in_a_newline_are_not_path_safe(checkpoints, tmp_path):
    from pipelines.batch.validate import REASON, validate_batch
    from pipelines.spec import InputSpec

    out = validate_batch(pa.table({"id": ["ok\n", "ok"], "prompt": ["a", "b"]}), InputSpec(path="x", id_column="id"),
                         set())
    assert out[REASON].to_pylist() == ["unsafe_id", None]
    spec = make_spec("in", "out", checkpoints)
    spec["models"][0]["name"] = "gan\n"
    with pytest.raises(SpecError, match="not path-safe"):
        load_spec(spec)


def _invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A *string* column holding bytes that are not UTF-8, as a foreign writer can produce (Parquet does not check)."""
    return pa.array(values, pa.binary()).view(pa.string())


def test_invalid_utf8_in_a_string_column_is_a_rejected_row(ray_local, checkpoints, tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": _invalid_utf8_strings([b"a red circle", b"\xff\xfe bad",
                                                                                      b"a blue square"])}),
                   tmp_path / "in" / "a.parquet")
    res = run_job(load_spec(make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints)))
    assert res.rejected == {"invalid_utf8": 1} and res.images_total == {"gan": 4}
    rejected = pq.read_table(tmp_path / "out" / "rejected")
    assert rejected.column("id").to_pylist() == ["b"] and rejected.column("reason").to_pylist() == ["invalid_utf8"]


def test_input_files_with_different_columns_are_refused_naming_both(checkpoints, tmp_path, capsys):
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle"], ["a"])
    write_prompts(tmp_path / "in" / "b.parquet", ["a blue square"], ["b"], sku=["s1"])
    assert _cli(make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints), tmp_path) == 2
    err = capsys.readouterr().err
    assert "disagree on their columns" in err and "a.parquet" in err and "b.parquet" in err and "sku" in err
    assert not (tmp_path / "out").exists()


def test_bounds_and_strict_types(checkpoints, tmp_path, capsys):
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle"], ["a"])
    good = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints)
    # an embedded Ray is not asked for hundreds of processes on a small machine (own process: no Ray running yet)
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(good))
    run = subprocess.run([sys.executable, "-m", "jobs.cli", "generate", str(p), "--set", "models.0.resources.actors=400",
                          "--set", "models.0.resources.max_actors=400"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert run.returncode == 2 and "an embedded Ray on this machine" in run.stderr, run.stderr[-2000:]
    for override, needle in (("models.0.resources.batch_size=100000", "batch_size"),
                             ("input.max_prompt_chars=10000000", "max_prompt_chars"),
                             ("models.0.sampling={candidates: 64}", "candidates x resources.batch_size"),
                             ('models.0.images_per_prompt="3"', "images_per_prompt")):
        spec = load_spec_error(good, override)
        assert needle in spec, (override, spec)
    assert not (tmp_path / "out").exists()


def load_spec_error(spec: dict, override: str) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(spec, [override] if "candidates" not in override else [override, "models.0.resources.batch_size=4096"])
    return str(e.value)


@pytest.mark.parametrize("template", ["{name:>50000000}", "{name[0]}", "{name.upper}", "{name!r}"])
def test_schedule_templates_take_plain_column_names_only(template):
    from pipelines.ops.schedule import ScheduleSpec

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "schedule.yaml").read_text())
    data["templates"] = [template]
    with pytest.raises(Exception, match="placeholders must be plain"):
        ScheduleSpec.model_validate(data)


def test_spec_errors_do_not_echo_secrets(checkpoints):
    spec = make_spec("in", "out", checkpoints)
    spec["input"]["storage_option"] = {"key": "AKIAPLANTED", "secret": "planted-secret-value"}  # the typo
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    assert "storage_option" in str(e.value)
    assert "planted-secret-value" not in str(e.value) and "AKIAPLANTED" not in str(e.value)
    spec = make_spec("in", "out", checkpoints, scoring={"enabled": True, "clip": None, "judge": None,
                                                        "storage_options": {"secret": "planted-secret-value"}})
    spec["models"][0]["sampling"] = {"candidates": 4}  # a spec-level error: its input is the whole spec
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    assert "candidates" in str(e.value) and "planted-secret-value" not in str(e.value)


def test_redact_covers_keys_urls_and_signatures():
    from pipelines.spec import redact

    planted = {
        "storage_options": {"key": "AKIA1", "secret": "s3cr3t", "client_kwargs": {"headers": {"Authorization": "Bearer t0k"}}},
        "connection_string": "DefaultEndpointsProtocol=https;AccountKey=azkey",
        "checkpoint": "s3://user:pa55@bucket/ckpt",
        "presigned": "https://bucket.s3.amazonaws.com/k?X-Amz-Credential=AKIA2&X-Amz-Signature=abc123&x=1",
        "sas": "https://acct.blob.core.windows.net/c/b?sv=2020&sig=azsig&se=2030",
        "list": ["https://u:p@host/x", "plain"],
    }
    text = json.dumps(redact(planted))
    for secret in ("AKIA1", "s3cr3t", "t0k", "azkey", "pa55", "AKIA2", "abc123", "azsig"):
        assert secret not in text, (secret, text)
    r = redact(planted)
    assert r["checkpoint"] == "s3://***@bucket/ckpt" and r["list"][1] == "plain"
    assert "x=1" in r["presigned"] and "sv=2020" in r["sas"]  # what is not secret stays readable
