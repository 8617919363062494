"""The CLI's shape: light commands stay light, the generate job never loads training code."""

from __future__ import annotations

import subprocess
import sys


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
