"""Duplicate ids on Ray Data: the same reasons as validating the whole input at once with every duplicated id known,
whether the duplicated ids reach the validate tasks by reference or are joined to the rows; reads ask Parquet for
the columns a sample uses."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_spec
from promptmill.pipelines.batch import duplicates
from promptmill.pipelines.batch.job import validated_prompts
from promptmill.pipelines.batch.read import plan_input
from promptmill.pipelines.batch.validate import ID, REASON, validate_batch
from promptmill.pipelines.spec import load_spec


@pytest.mark.parametrize("broadcast", [duplicates.BROADCAST_IDS, 0], ids=["by reference", "joined"])
def test_duplicate_ids_follow_the_whole_input_rule(ray_local, checkpoints, tmp_path, monkeypatch, broadcast):
    monkeypatch.setattr(duplicates, "BROADCAST_IDS", broadcast)
    ids = [f"i{k % 150}" for k in range(200)] + [None, None, "../x", "../x", "ok"]  # i0..i49 twice
    prompts = [("" if k % 7 == 0 else f"p{k}") for k in range(200)] + ["a", "b", "c", "d", "e"]
    (tmp_path / "in").mkdir()
    for part in range(3):  # three files: copies of an id in different read tasks
        rows = slice(part * 70, (part + 1) * 70)
        pq.write_table(pa.table({"id": ids[rows], "prompt": prompts[rows], "unused": list(range(len(ids[rows])))}),
                       tmp_path / "in" / f"{part}.parquet")
    spec = load_spec(make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints))
    plan = plan_input(spec.input)
    got = validated_prompts(plan, spec).take_all()
    assert "unused" not in got[0]  # Parquet read only what a sample uses
    counts = Counter(i for i in ids if i is not None)
    want = validate_batch(pa.table({"id": ids, "prompt": prompts}), spec.input, {i for i, c in counts.items() if c > 1})
    assert sorted((r[ID] or "", r["prompt"], r[REASON] or "") for r in got) == sorted(
        (i or "", p, r or "") for i, p, r in zip(want[ID].to_pylist(), want["prompt"].to_pylist(),
                                                 want[REASON].to_pylist()))
    assert sum(r[REASON] == "duplicate_id" for r in got) == 100  # i0..i49, both copies, whatever the prompt
