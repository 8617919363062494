"""A small ad-creative run made by the real generate job, for the review and delivery tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from conftest import make_spec, write_prompts
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.spec import load_spec

PROMPTS = ["a small red circle on the left", "a large blue square above a green triangle",
           "a big yellow triangle at the top", "a small purple circle on a white background"]


def ad_run(tmp: Path, checkpoints: dict[str, str], out: str, storage_options: dict | None = None,
           layout: str = "files") -> str:
    """4 prompts x 2 samples of the shipped GAN (3.8 MB: real shapes, so scores and the screenshot mean something),
    scored, with the kept columns sku / template / campaign."""
    src = write_prompts(tmp / "in" / "part-0.parquet", PROMPTS, [f"p{i}" for i in range(len(PROMPTS))],
                        sku=["s1", "s1", "s2", "s2"], template=[0, 1, 0, 1], campaign=["spring"] * 4)
    spec = make_spec(str(Path(src).parent), out, checkpoints,
                     input={"path": str(Path(src).parent), "id_column": "id", "keep_columns": ["sku", "template", "campaign"]},
                     output={"path": out, "storage_options": storage_options or {}, "format": layout})
    spec["models"][0]["checkpoint"] = "shipped:gan"
    run_job(load_spec(spec))
    return out


def copy_run(src: Path, dest: Path) -> Path:
    """A private copy of a local `files` run (each test writes its own decisions); image_path moved with it."""
    shutil.copytree(src, dest)
    for part in (dest / "metadata").glob("*.parquet"):
        t = pq.read_table(part)
        moved = pc.replace_substring(t["image_path"], str(src) + "/", str(dest) + "/")
        pq.write_table(t.set_column(t.column_names.index("image_path"), "image_path", moved.cast(pa.string())), part)
    return dest
