"""Scores in the job's metadata, `evaluate` against a moto-S3 run, and report.html rendered by headless Chromium."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import make_spec, write_prompts
from PIL import Image
from promptmill.jobs.cli import main as cli
from promptmill.jobs.dataset import write_shapes
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.spec import load_spec
from promptmill.pipelines.storage import filesystem

PROMPTS = ["a small red circle on the left", "a large blue square above a green triangle", "big yellow triangle, top",
           "a purple diamond in the center", "a photo of a dog on a beach", "<b>html & \"quotes\"</b>"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("ref") / "test"
    write_shapes(str(out), 400, "test", seed=3)
    return str(out)


def _two_model_spec(tmp_path: Path, out: str, checkpoints, **over) -> dict:
    write_prompts(tmp_path / "in" / "part-0.parquet", PROMPTS, [f"p{i}" for i in range(len(PROMPTS))])
    spec = make_spec(str(tmp_path / "in"), out, checkpoints, **over)
    spec["models"].append({"name": "dalle", "family": "transformer", "checkpoint": checkpoints["transformer"],
                           "images_per_prompt": 1, "sampling": {"top_k": 8, "candidates": 3},
                           "resources": {"batch_size": 4}})
    return spec


def test_job_scores_every_image_and_reranks(ray_local, checkpoints, tmp_path, reference):
    out = tmp_path / "out"
    spec = _two_model_spec(tmp_path, str(out), checkpoints, metrics={"reference": reference, "max_images": 100})
    res = run_job(load_spec(spec))
    rows = pq.read_table(out / "metadata").to_pylist()
    assert len(rows) == 6 * 2 + 6
    for r in rows:
        assert 0 <= r["clip_score"] <= 100
        judged = json.loads(r["judged"])
        assert judged["background"] in ("black", "white", "gray")
        in_domain = not r["prompt"].startswith(("a photo", "<b>"))
        assert (r["prompt_match"] is not None) == in_domain, r
        if r["model"] == "dalle":
            assert r["candidates"] == 3 and 0 <= r["candidate_index"] < 3
            assert r["candidate_score"] == pytest.approx(r["clip_score"], abs=1e-3)  # the kept one, rescored
        else:
            assert r["candidates"] == 1 and r["candidate_index"] == 0 and r["candidate_score"] is None
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["scores"]) == {"gan", "dalle"}
    m = summary["metrics"]["models"]
    assert set(m) == {"gan", "dalle", "real_vs_real"}
    # untrained tiny models are far from real renders; the floor is not
    assert m["real_vs_real"]["fid"] < min(m["gan"]["fid"], m["dalle"]["fid"])
    assert res.summary["metrics"]["models"] == m
    assert (out / "report.html").exists()


def test_scoring_off_leaves_the_columns_null(ray_local, checkpoints, tmp_path):
    out = tmp_path / "out"
    write_prompts(tmp_path / "in" / "part-0.parquet", PROMPTS[:2], ["a", "b"])
    spec = make_spec(str(tmp_path / "in"), str(out), checkpoints, scoring={"enabled": False})
    run_job(load_spec(spec))
    for r in pq.read_table(out / "metadata").to_pylist():
        assert r["clip_score"] is None and r["prompt_match"] is None and r["judged"] is None


def test_rerank_without_a_clip_is_a_spec_error(checkpoints, tmp_path):
    from promptmill.pipelines.spec import SpecError

    spec = _two_model_spec(tmp_path, str(tmp_path / "o"), checkpoints, scoring={"clip": None})
    with pytest.raises(SpecError, match="candidates"):
        load_spec(spec)


def test_evaluate_a_run_on_s3(ray_local, checkpoints, tmp_path, s3, reference, capsys):
    out = "s3://bucket/evaluated"
    spec = _two_model_spec(tmp_path, out, checkpoints, output={"path": out, "storage_options": s3})
    run_job(load_spec(spec))
    assert cli(["evaluate", out, "--reference", reference, "--max-images", "100",
                "--storage-options", json.dumps(s3)]) == 0
    printed = capsys.readouterr().out
    assert "real_vs_real" in printed and "dalle" in printed
    fs, root = filesystem(out, s3)
    summary = json.loads(fs.cat_file(f"{root}/summary.json"))
    assert set(summary["metrics"]["models"]) == {"gan", "dalle", "real_vs_real"}
    assert summary["metrics"]["models"]["gan"]["n_images"] == 12
    html = fs.cat_file(f"{root}/report.html").decode()
    assert "data:image/png;base64," in html and "real_vs_real" in html  # thumbnails embedded: readable off S3


CHECK = """<script>window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-broken', imgs.filter(i => !i.complete || i.naturalWidth === 0).length);
});</script>"""


def test_report_renders_in_headless_chromium(ray_local, checkpoints, tmp_path):
    chromium = shutil.which("chromium")
    assert chromium, "a headless Chromium is part of the test set-up: run `make chromium`"
    out = tmp_path / "out"
    run_job(load_spec(_two_model_spec(tmp_path, str(out), checkpoints)))
    assert cli(["report", str(out)]) == 0
    html = (out / "report.html").read_text()
    assert "&lt;b&gt;html &amp;" in html  # prompts are escaped, not injected
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", CHECK + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"]
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    n = int(re.search(r'data-images="(\d+)"', dom).group(1))
    assert n >= 6 * 2 + 1  # the side-by-side gallery (6 prompts x 2 models) and the plot
    assert re.search(r'data-broken="(\d+)"', dom).group(1) == "0"
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,1600", (out / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True)
    img = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")).astype(float)
    assert img.std() > 20  # not a blank page
    assert (np.abs(np.diff(img, axis=0)).sum(-1) > 30).mean() > 0.01  # edges: text and thumbnails drawn
