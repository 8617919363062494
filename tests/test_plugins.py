"""Generator families as plugins: a package registering an entry point in `promptmill.generators` runs through the
same job; an unknown family is a preflight error that lists the installed ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_spec, write_prompts
from promptmill.models.images import decode_image

ROOT = Path(__file__).resolve().parents[1]


def install_example_family(site: Path) -> None:
    """What `pip install examples/plugin_family` leaves in site-packages: the module and a dist-info whose
    entry_points.txt registers it (written here, so the test needs no network and no build)."""
    site.mkdir(parents=True)
    shutil.copy(ROOT / "examples" / "plugin_family" / "acme_promptmill.py", site)
    info = site / "acme_promptmill-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-promptmill\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[promptmill.generators]\nacme = acme_promptmill:AcmeDiscs\n")


def test_a_plugin_family_runs_through_the_job_batch_invariantly(tmp_path):
    site = tmp_path / "site"
    install_example_family(site)
    (tmp_path / "acme-ckpt").mkdir()
    (tmp_path / "acme-ckpt" / "config.json").write_text(json.dumps({"size": 24}))
    write_prompts(tmp_path / "in" / "a.parquet", ["a red thing", "a blue thing", "a red thing"], ["a", "b", "c"])
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), {"gan": ""}, scoring={"enabled": False})
    spec["models"] = [{"name": "discs", "family": "acme", "checkpoint": str(tmp_path / "acme-ckpt"),
                       "images_per_prompt": 2, "sampling": {"radius": 0.25}, "resources": {"batch_size": 2}}]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}"}  # the embedded Ray's workers too
    env.pop("RAY_ADDRESS", None)
    run = subprocess.run([sys.executable, "-m", "promptmill.jobs.cli", "generate", str(tmp_path / "spec.yaml")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {(r["id"], r["sample"]): r for r in pq.read_table(tmp_path / "out" / "metadata").to_pylist()}
    assert len(rows) == 6 and {r["family"] for r in rows.values()} == {"acme"}
    images = {k: decode_image((tmp_path / "out" / r["image_path"]).read_bytes()) for k, r in rows.items()}
    assert all(im.shape == (24, 24, 3) for im in images.values())
    # the plugin's own batch invariance holds through the job: same prompt, same seed -> same pixels
    sys.path.insert(0, str(site))
    try:
        from acme_promptmill import AcmeDiscs

        alone = AcmeDiscs(24).generate(["a blue thing"], [rows[("b", 1)]["seed"]], radius=0.25)[0]
    finally:
        sys.path.remove(str(site))
    assert np.array_equal(images[("b", 1)], alone)
    assert not np.array_equal(images[("a", 0)], images[("a", 1)])  # two seeds, two places


def test_an_unknown_family_is_an_error_listing_the_installed_ones(checkpoints, tmp_path, capsys):
    from promptmill.jobs.cli import main

    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle"], ["a"])
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints)
    spec["models"][0]["family"] = "stylegan"
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["generate", str(tmp_path / "spec.yaml")]) == 2
    err = capsys.readouterr().err
    assert "models[0].family: Value error, 'stylegan' is not an installed generator family" in err
    assert "['diffusers', 'gan', 'transformer']" in err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["gan", "transformer"])
def test_our_families_are_registered_as_entry_points(family):
    import importlib.metadata

    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="promptmill.generators")}
    from promptmill.models import generator_class

    assert family in eps and generator_class(family).family == family
