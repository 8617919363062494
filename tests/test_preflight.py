"""Bad input found before any work: exit code 2, one message naming the file/field, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_spec, write_prompts

from jobs.cli import main


def run_cli(spec: dict, tmp_path: Path, *sets: str) -> int:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    args = ["generate", str(p)]
    for s in sets:
        args += ["--set", s]
    return main(args)


@pytest.fixture
def good(tmp_path, checkpoints):
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", "a blue square"], ["a", "b"])
    return make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints)


def expect_exit_2(spec, tmp_path, capsys, needle: str, *sets: str) -> str:
    assert run_cli(spec, tmp_path, *sets) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (tmp_path / "out").exists(), "preflight wrote output"
    return err


def test_missing_prompt_column(good, tmp_path, capsys):
    expect_exit_2(good, tmp_path, capsys, "missing prompt column 'text'", "input.prompt_column=text")


def test_wrong_column_type(good, tmp_path, capsys):
    pq.write_table(pa.table({"id": ["x"], "prompt": [3]}), tmp_path / "in" / "b.parquet")
    err = expect_exit_2(good, tmp_path, capsys, "prompt column 'prompt' has type int64")
    assert "b.parquet" in err


def test_corrupt_parquet_among_good_ones(good, tmp_path, capsys):
    write_prompts(tmp_path / "in" / "c.parquet", ["fine"], ["c"])
    good_bytes = (tmp_path / "in" / "c.parquet").read_bytes()
    (tmp_path / "in" / "b.parquet").write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated
    err = expect_exit_2(good, tmp_path, capsys, "not a readable Parquet file")
    assert "b.parquet" in err and "c.parquet" not in err


def test_missing_input_and_empty_dir(good, tmp_path, capsys):
    expect_exit_2(good, tmp_path, capsys, "no such file or directory", f"input.path={tmp_path}/nope")
    (tmp_path / "empty").mkdir()
    expect_exit_2(good, tmp_path, capsys, "no .parquet files", f"input.path={tmp_path}/empty")


def test_unknown_family_is_a_spec_error(good, tmp_path, capsys):
    expect_exit_2(good, tmp_path, capsys, "models[0].family", "models.0.family=diffusion")


def test_missing_and_corrupt_checkpoint(good, tmp_path, capsys, checkpoints):
    expect_exit_2(good, tmp_path, capsys, "models[0] (gan).checkpoint", f"models.0.checkpoint={tmp_path}/none")
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["gan"], bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    expect_exit_2(good, tmp_path, capsys, "model.safetensors is corrupt", f"models.0.checkpoint={bad}")
    (bad / "config.json").write_text("{not json")
    expect_exit_2(good, tmp_path, capsys, "config.json is not valid JSON", f"models.0.checkpoint={bad}")


def test_family_mismatch_and_bad_sampling(good, tmp_path, capsys, checkpoints):
    expect_exit_2(good, tmp_path, capsys, "checkpoint", f"models.0.checkpoint={checkpoints['transformer']}")
    expect_exit_2(good, tmp_path, capsys, "models[0] (gan).sampling", "models.0.sampling={top_k: 5}")


def test_output_of_a_different_spec_is_refused(good, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_spec.json").write_text(json.dumps(
        {"seed": 99, "image_format": "png", "models": {}}))
    assert run_cli(good, tmp_path) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_spec.json"]
