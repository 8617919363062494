"""The CLI's shape: light commands stay light, the generate job never loads training code."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_building_the_cli_imports_neither_torch_nor_ray():
    mods = _modules_after("from promptmill.jobs.cli import main\n"
                          "try:\n    main(['status', '--help'])\nexcept SystemExit:\n    pass")
    assert "torch" not in mods and "ray" not in mods


def test_the_generate_job_imports_no_training_code():
    mods = _modules_after("import promptmill.pipelines.batch.job, promptmill.jobs.generate")
    assert "promptmill.pipelines.batch.job" in mods
    assert not {m for m in mods if m.startswith(("promptmill.pipelines.training.", "promptmill.pipelines.ops."))}, \
        sorted(m for m in mods if m.startswith("promptmill.pipelines.training."))


def test_trackers_and_c2pa_are_imported_only_when_configured():
    mods = _modules_after("from promptmill.jobs.cli import main\n"
                          "import promptmill.pipelines.batch.job, promptmill.jobs.generate, promptmill.pipelines.runs.tracking")
    assert not {m for m in mods if m.split(".")[0] in ("mlflow", "wandb", "c2pa")}


def test_models_never_import_pipelines_or_ray():
    mods = _modules_after("import promptmill.models, promptmill.models.gan, promptmill.models.transformer, "
                          "promptmill.models.clip, promptmill.models.judge, promptmill.models.vq, promptmill.models.shapes, "
                          "promptmill.models.shapes.scenes, promptmill.models.shapes.geometry, "
                          "promptmill.models.shapes.near_miss, promptmill.models.images")
    assert not {m for m in mods if m.startswith("promptmill.pipelines") or m == "ray"}


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-m", "promptmill.jobs.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_version_and_one_line_errors_with_the_traceback_on_request(tmp_path):
    from importlib.metadata import version

    assert _cli("--version").stdout.strip() == f"promptmill {version('promptmill')}"
    dead = {"RAY_API_SERVER_ADDRESS": "http://127.0.0.1:9"}  # nothing listens on the discard port
    down = _cli("status", "some-id", env=dead)
    assert down.returncode == 1 and down.stderr.count("\n") == 1, down.stderr
    assert down.stderr.startswith("promptmill: error: cannot reach the cluster's Jobs API") and "127.0.0.1:9" in down.stderr
    verbose = _cli("--log-level", "debug", "status", "some-id", env=dead)
    assert "Traceback" in verbose.stderr and verbose.stderr.strip().splitlines()[-1] == down.stderr.strip()
    empty = _cli("report", str(tmp_path))
    assert empty.returncode != 0 and empty.stderr.count("\n") == 1 and "holds no promptmill run" in empty.stderr


def test_schedule_at_without_once_is_an_error_and_a_missing_catalog_names_its_field(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    at = _cli("schedule", str(root / "examples" / "schedule.yaml"), "--at", "2026-11-30T06:00:00+01:00")
    assert at.returncode == 2 and "--at names the slot to fire once: add --once" in at.stderr
    bad = tmp_path / "schedule.yaml"
    bad.write_text((root / "examples" / "schedule.yaml").read_text().replace("catalog.parquet", "nope.parquet"))
    missing = _cli("schedule", str(bad), "--once", "--dry-run")
    assert missing.returncode == 2 and missing.stderr.startswith("promptmill: error: catalog.path ")
    assert "Traceback" not in missing.stderr


def test_one_spelling_per_option_with_the_old_ones_hidden_for_a_release(tmp_path):
    """--storage-options JSON on every command (stage-model's KEY=VALUE form hidden), the global --log-level DEBUG for
    tracebacks (generate's --verbose hidden); the old spellings still work, with a warning."""
    for cmd in ("stage-model", "score", "report", "evaluate", "review", "deliver"):
        text = _cli(cmd, "--help").stdout
        assert "--storage-options JSON" in text and "--storage-option " not in text, (cmd, text)
    assert "--verbose" not in _cli("generate", "--help").stdout
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    for flags in (["--storage-options", '{"auto_mkdir": true}'], ["--storage-option", "auto_mkdir=true"]):
        dst = tmp_path / "dst" / flags[0].strip("-")
        staged = _cli("stage-model", str(src), str(dst), *flags)
        assert staged.returncode == 0 and (dst / "config.json").exists(), staged.stderr
        assert ("deprecated" in staged.stderr) == (flags[0] == "--storage-option")
    bad = _cli("stage-model", str(src), str(tmp_path / "x"), "--storage-options", "[1]")
    assert bad.returncode == 2 and "--storage-options: wants a JSON object, got list" in bad.stderr
    missing = tmp_path / "missing.yaml"
    for flags, traceback in (([], False), (["--log-level", "DEBUG"], True)):
        run = _cli(*flags, "generate", str(missing))
        assert run.returncode == 2 and ("Traceback" in run.stderr) == traceback, run.stderr
    old = _cli("generate", str(missing), "--verbose")
    assert old.returncode == 2 and "Traceback" in old.stderr and "--verbose is deprecated" in old.stderr


def test_make_setup_installs_the_torch_build_readme_says(tmp_path):
    """`make setup TORCH_INDEX=...` asks pip for torch from that index (the CPU build on Linux); without it, pip's
    default index decides (README says what each machine gets)."""
    import shutil
    from pathlib import Path

    if not shutil.which("make"):
        pytest.skip("no make")
    root = Path(__file__).resolve().parents[1]

    def dry(*extra: str) -> str:
        return subprocess.run(["make", "-n", "-B", f"VENV={tmp_path}/venv", *extra, "setup"], cwd=root,
                              capture_output=True, text=True, check=True).stdout

    cpu = "https://download.pytorch.org/whl/cpu"
    assert f"install -q torch==2.13.0 --index-url {cpu}" in dry(f"TORCH_INDEX={cpu}")
    assert "--index-url" not in dry() and "install -q torch==2.13.0" in dry()
    assert f"TORCH_INDEX={cpu}" in (root / "README.md").read_text()
