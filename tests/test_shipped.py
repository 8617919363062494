"""Checks against the shipped checkpoints in models/checkpoints/ (the files the demo and users load)."""

from __future__ import annotations

from pathlib import Path

import pytest
from promptmill.jobs.dataset import write_shapes
from promptmill.jobs.eval_models import load_test_split
from promptmill.models.judge import load_judge
from promptmill.pipelines.model_quality import judge_accuracy

CKPT = Path(__file__).resolve().parents[1] / "models" / "checkpoints"


@pytest.fixture(scope="module")
def test_split(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "test"
    write_shapes(str(out), 2000, "test", seed=0)
    return load_test_split(str(out), 2000)


def test_judge_is_at_least_99_percent_per_attribute_on_real_renders(test_split):
    acc = judge_accuracy(load_judge(str(CKPT / "judge")), test_split)
    assert min(acc.values()) >= 0.99, acc


@pytest.mark.parametrize("name", ["gan", "dalle"])
def test_shipped_generators_load_and_draw(name):
    from promptmill.models import load_generator

    if not (CKPT / name).exists():
        pytest.skip(f"models/checkpoints/{name} not shipped yet")
    g = load_generator(str(CKPT / name), "cpu")
    out = g.generate(["a large red circle in the center, on a black background"], [0])
    assert out.shape == (1, 32, 32, 3) and out.std() > 5  # not a blank image
