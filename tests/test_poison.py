"""Poison rows do not sink the job: a test-only family raises on marked prompts; those rows (alone, after a retry
and a split of their batch) go to rejected/ as generation_error, everything else is written; past
`output.max_error_fraction` the job fails with one line and resumes. The scoring stage isolates its failures the
same way (scoring_error, scores null, the image kept)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from conftest import make_spec, write_prompts

ROOT = Path(__file__).resolve().parents[1]

FAMILY = '''
import numpy as np
from pydantic import BaseModel, ConfigDict


class Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Poison:
    """Draws a grey level from the seed; raises on any batch holding a prompt marked POISON."""

    family = "poison"
    Sampling = Sampling
    height = width = 8

    @classmethod
    def load(cls, url, device, storage_options=None):
        return cls()

    def generate(self, prompts, seeds, **sampling):
        if any("POISON" in p for p in prompts):
            raise RuntimeError("cannot draw a poisoned prompt")
        return np.stack([np.full((8, 8, 3), s % 256, np.uint8) for s in seeds]).reshape(len(seeds), 8, 8, 3)
'''


def _install(site: Path) -> None:
    site.mkdir(parents=True)
    (site / "poison_family.py").write_text(FAMILY)
    info = site / "poison_family-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: poison-family\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[promptmill.generators]\npoison = poison_family:Poison\n")


def test_poison_rows_go_to_rejected_and_the_job_goes_on(tmp_path):
    site = tmp_path / "site"
    _install(site)
    (tmp_path / "ckpt").mkdir()
    prompts = [f"prompt {i}" + (" POISON" if i in (3, 11) else "") for i in range(20)]
    write_prompts(tmp_path / "in" / "a.parquet", prompts, [f"r{i:02d}" for i in range(20)])
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), {"gan": ""}, scoring={"enabled": False})
    spec["models"] = [{"name": "p", "family": "poison", "checkpoint": str(tmp_path / "ckpt"),
                       "resources": {"batch_size": 8}}]
    spec["output"]["max_error_fraction"] = 0.05
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PYTHONPATH": f"{site}:{os.environ.get('PYTHONPATH', '')}"}
    env.pop("RAY_ADDRESS", None)

    def run(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "promptmill.jobs.cli", "generate", str(tmp_path / "spec.yaml"), *extra],
                              env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)

    first = run()  # 2 of 20 fail: over 5 %
    assert first.returncode == 1, first.stderr[-3000:]
    line = [ln for ln in first.stderr.splitlines() if ln.startswith("promptmill: error:")]
    assert len(line) == 1 and "2 of 20 images failed to generate" in line[0] and "poisoned prompt" in line[0], line
    second = run("--set", "output.max_error_fraction=0.2")  # the same output, a looser budget: it finishes
    assert second.returncode == 0, second.stderr[-3000:]
    rows = pq.read_table(tmp_path / "out" / "metadata").to_pylist()
    assert sorted(r["id"] for r in rows) == [f"r{i:02d}" for i in range(20) if i not in (3, 11)]
    rejected = [r for p in sorted((tmp_path / "out" / "rejected").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    assert sorted(r["id"] for r in rejected) == ["r03", "r11"]
    assert {r["reason"] for r in rejected} == {"generation_error"}
    assert all("cannot draw a poisoned prompt" in r["error"] for r in rejected)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["rejected"] == {"generation_error": 2} and summary["images_total"] == {"p": 18}
    keys = [(r["id"], r["model"], r["sample"]) for r in rows]  # the chaos suite's checks: exactly once, tidy
    assert len(keys) == len(set(keys)) == 18 and not (tmp_path / "out" / "_staging").exists()
    out = tmp_path / "out"
    assert sorted(str(p) for p in (out / "images").rglob("*.png")) == sorted(str(out / r["image_path"]) for r in rows)


def test_the_scoring_stage_isolates_a_row_it_cannot_score():
    from promptmill.models.shapes.scenes import example
    from promptmill.pipelines.batch.score import ScoreStage
    from promptmill.pipelines.spec import ScoringSpec

    stage = ScoreStage(ScoringSpec())
    real = stage.score

    def score(pixels, prompts):
        if any("POISON" in p for p in prompts):
            raise ValueError("cannot score this one")
        return real(pixels, prompts)

    stage.score = score
    ex = [example(i, 3, "test") for i in range(6)]
    prompts = [e[1] for e in ex]
    prompts[4] += " POISON"
    out = stage({"prompt": np.array(prompts, object), "pixels": np.stack([e[2] for e in ex])})
    assert out["scoring_error"][4] == "ValueError: cannot score this one" and out["clip_score"][4] is None
    others = [i for i in range(6) if i != 4]
    assert all(out["scoring_error"][i] is None and out["clip_score"][i] is not None for i in others)
    assert all(out["prompt_match"][i] is not None for i in others)  # the real renders were judged
