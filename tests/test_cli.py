"""The CLI's shape: light commands stay light, the generate job never loads training code."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_building_the_cli_imports_neither_torch_nor_ray():
    mods = _modules_after("from jobs.cli import main\n"
                          "try:\n    main(['status', '--help'])\nexcept SystemExit:\n    pass")
    assert "torch" not in mods and "ray" not in mods


def test_the_generate_job_imports_no_training_code():
    mods = _modules_after("import pipelines.batch.job, jobs.generate")
    assert "pipelines.batch.job" in mods
    assert not {m for m in mods if m.startswith(("pipelines.training.", "pipelines.ops."))}, \
        sorted(m for m in mods if m.startswith("pipelines.training."))


def test_models_never_import_pipelines_or_ray():
    mods = _modules_after("import models, models.gan, models.transformer, models.clip, models.judge, models.vq, "
                          "models.shapes, models.shapes.evaluate, models.images")
    assert not {m for m in mods if m.startswith("pipelines") or m == "ray"}
