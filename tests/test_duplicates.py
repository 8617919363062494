"""Duplicate ids and resume on Ray Data: the same reasons as validating the whole input at once with every duplicated
id known, and the same missing samples as a set difference, whether the work runs in one task, as a hash shuffle of
several partitions, or as a join; reads ask Parquet for the columns a sample uses."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_spec
from promptmill.pipelines.batch import aggregate, duplicates
from promptmill.pipelines.batch.job import validated_prompts
from promptmill.pipelines.batch.read import plan_input
from promptmill.pipelines.batch.validate import ID, REASON, validate_batch
from promptmill.pipelines.spec import load_spec

SHUFFLED = 64  # rows per partition: the 205 rows below in 4 hash partitions


@pytest.mark.parametrize(("rows_per_partition", "broadcast"), [
    (aggregate.ROWS_PER_PARTITION, duplicates.BROADCAST_IDS), (SHUFFLED, duplicates.BROADCAST_IDS),
    pytest.param(SHUFFLED, 0, marks=pytest.mark.slow)],  # joined (over 1M duplicated ids): 41 s, make chaos
    ids=["one task", "shuffled, by reference", "shuffled, joined"])
def test_duplicate_ids_follow_the_whole_input_rule(ray_local, checkpoints, tmp_path, monkeypatch, rows_per_partition,
                                                  broadcast):
    monkeypatch.setattr(aggregate, "ROWS_PER_PARTITION", rows_per_partition)
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


@pytest.mark.parametrize("rows_per_partition", [aggregate.ROWS_PER_PARTITION, SHUFFLED], ids=["one task", "joined"])
def test_resume_draws_exactly_the_samples_the_output_lacks(ray_local, monkeypatch, rows_per_partition):
    import ray.data
    from promptmill.pipelines.batch.resume import finished_per_model, missing

    monkeypatch.setattr(aggregate, "ROWS_PER_PARTITION", rows_per_partition)
    samples = [{"id": f"i{k}", "sample": s, "prompt": f"p{k}"} for k in range(100) for s in range(3)]
    done = [("gan", f"i{k}", s) for k in range(0, 100, 3) for s in range(3) if (k + s) % 2] + [
        ("gan", "i7", 5), ("gan", "gone", 0),  # samples no longer asked for
        ("dalle", "i1", 0), ("dalle", "i2", 1)]  # another model's: never subtracted from gan's
    finished = ray.data.from_items([{"model": m, "id": i, "sample": s} for m, i, s in done],
                                   override_num_blocks=4).materialize()
    assert finished_per_model(finished) == {"gan": len(done) - 2, "dalle": 2}
    got = missing(ray.data.from_items(samples, override_num_blocks=5), finished, "gan", len(samples)).take_all()
    want = {(r["id"], r["sample"]) for r in samples} - {(i, s) for m, i, s in done if m == "gan"}
    assert sorted((r["id"], r["sample"]) for r in got) == sorted(want) and len(got) == len(want)
    assert all(r["prompt"] == "p" + r["id"][1:] for r in got)  # rows whole
