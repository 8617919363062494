"""A small ad-creative run made by the real generate job, for the review and delivery tests."""

from __future__ import annotations

from pathlib import Path

from conftest import make_spec, write_prompts
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.spec import load_spec

PROMPTS = ["a small red circle on the left", "a large blue square above a green triangle", "big yellow triangle, top",
           "a small red circle, top"]


def ad_run(tmp: Path, checkpoints: dict[str, str], out: str, storage_options: dict | None = None) -> str:
    """4 prompts x 2 samples of the tiny GAN, scored, with the kept columns sku / template / campaign."""
    src = write_prompts(tmp / "in" / "part-0.parquet", PROMPTS, [f"p{i}" for i in range(len(PROMPTS))],
                        sku=["s1", "s1", "s2", "s2"], template=[0, 1, 0, 1], campaign=["spring"] * 4)
    spec = make_spec(str(Path(src).parent), out, checkpoints,
                     input={"path": str(Path(src).parent), "id_column": "id", "keep_columns": ["sku", "template", "campaign"]},
                     output={"path": out, "storage_options": storage_options or {}})
    run_job(load_spec(spec))
    return out
