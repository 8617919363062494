"""Scheduled ad-creative batches: rendering, the blocklist, one-slot fires (twice: the second is a no-op),
catch-up, and a long-running loop that survives a failed fire."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import CAPTIONS
from promptmill.jobs.cli import main as cli
from promptmill.pipelines.ops.schedule import due_slots, load_schedule, render_prompts, run_forever, run_id, run_url
from promptmill.pipelines.spec import SpecError

UTC = dt.UTC


def _schedule(tmp_path: Path, checkpoints, **over) -> Path:
    pq.write_table(pa.table({"sku": ["s1", "s2", "s3"], "color": ["red", "blue", "orange"],
                             "shape": ["circle", "square", "triangle"], "size": ["small", "large", "small"]}),
                   tmp_path / "catalog.parquet")
    data = {
        "name": "ads", "cron": "0 * * * *", "timezone": "Europe/Berlin", "start": "2026-11-24T06:00:00+01:00",
        "catalog": {"path": str(tmp_path / "catalog.parquet")},
        "templates": ["a {size} {color} {shape} on the left", "{color} {shape}, top"],
        "blocklist": {"words": ["orange"]},
        "models": [{"name": "gan", "family": "gan", "checkpoint": checkpoints["gan"], "resources": {"batch_size": 8}}],
        "scoring": {"enabled": False},
        "output": {"prefix": str(tmp_path / "runs")},
        **over,
    }
    p = tmp_path / "schedule.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_render_fills_templates_from_catalog_columns(tmp_path, checkpoints):
    s = load_schedule(str(_schedule(tmp_path, checkpoints)))
    t = render_prompts(s).to_pylist()
    assert len(t) == 6
    assert t[0] == {"id": "s1-t0", "prompt": "a small red circle on the left", "sku": "s1", "template": 0}
    assert t[3]["prompt"] == "blue square, top"
    from promptmill.models.tokenizer import WordTokenizer, words

    vocab = set(WordTokenizer.train(CAPTIONS, max_len=12).vocab)  # what the tiny checkpoints were built with
    drawn = {w for r in t if "orange" not in r["prompt"] for w in words(r["prompt"])}  # orange: blocked, not drawn
    assert drawn <= vocab, drawn - vocab  # the rendered prompts use no word the tiny models map to <unk>


def test_a_template_naming_a_missing_column_is_refused(tmp_path, checkpoints):
    s = load_schedule(str(_schedule(tmp_path, checkpoints, templates=["a {colour} {shape}"])))
    with pytest.raises(SpecError, match=r"templates\[0\].*colour"):
        render_prompts(s)
    with pytest.raises(SpecError, match="cron"):
        load_schedule(str(_schedule(tmp_path, checkpoints, cron="every day")))


def test_once_twice_runs_one_slot_once_and_blocks(ray_local, tmp_path, checkpoints, capsys):
    """A scheduled ad batch as a team runs it: scoring and the report on, the catalog's columns carried."""
    path = str(_schedule(tmp_path, checkpoints, scoring={"enabled": True}))
    assert cli(["schedule", path, "--once", "--at", "2026-11-24T08:30:00+01:00"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["run"] == "ads-20261124T070000Z" and first["status"] == "complete"
    assert first["rejected"] == {"blocked": 2}
    out = tmp_path / "runs" / "ads-20261124T070000Z"
    assert pq.read_table(out / "prompts.parquet").num_rows == 6  # auditable: what was rendered
    assert {r["reason"] for r in pq.read_table(out / "rejected").to_pylist()} == {"blocked"}
    rows = pq.read_table(out / "metadata").to_pylist()
    assert len(rows) == 4 and all(r["clip_score"] is not None and r["scoring_error"] is None for r in rows)
    assert {r["sku"] for r in rows} == {"s1", "s2"} and (out / "report.html").exists()
    stamp = (out / "_SUCCESS").stat().st_mtime_ns
    assert cli(["schedule", path, "--once", "--at", "2026-11-24T08:59:59+01:00"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "already complete"
    assert (out / "_SUCCESS").stat().st_mtime_ns == stamp


def test_dry_run_prints_and_writes_nothing(tmp_path, checkpoints, capsys):
    assert cli(["schedule", str(_schedule(tmp_path, checkpoints)), "--dry-run", "--at", "2026-11-24T09:00:00Z"]) == 0
    out = capsys.readouterr().out
    assert "BLOCKED a small orange triangle on the left" in out and '"status": "dry run"' in out
    assert not (tmp_path / "runs").exists()


def test_catchup_runs_every_missed_slot_or_only_the_latest(tmp_path, checkpoints):
    now = dt.datetime(2026, 11, 24, 9, 30, tzinfo=UTC)  # 10:30 Berlin: slots 06, 07, 08, 09, 10
    s = load_schedule(str(_schedule(tmp_path, checkpoints, catchup=True)))
    slots = due_slots(s, now)
    assert [run_id(s, t) for t in slots] == [f"ads-20261124T{h:02d}0000Z" for h in (5, 6, 7, 8, 9)]
    done = Path(run_url(s, slots[1]))
    done.mkdir(parents=True)
    (done / "_SUCCESS").write_bytes(b"")
    assert len(due_slots(s, now)) == 4
    latest_only = load_schedule(str(_schedule(tmp_path, checkpoints, catchup=False)))
    assert [run_id(s, t) for t in due_slots(latest_only, now)] == ["ads-20261124T090000Z"]


def test_the_loop_sleeps_to_each_fire_and_survives_a_failed_one(tmp_path, checkpoints):
    s = load_schedule(str(_schedule(tmp_path, checkpoints, start="2026-11-24T10:00:00+01:00")))
    now = [dt.datetime(2026, 11, 24, 9, 0, 0, tzinfo=UTC)]  # exactly the 10:00 Berlin slot
    fired, slept = [], []

    def fire_fn(sched, slot):
        fired.append(run_id(sched, slot))
        if len(fired) == 1:
            raise RuntimeError("the cluster is down")
        return {"status": "complete"}

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += dt.timedelta(seconds=seconds)

    run_forever(s, clock=lambda: now[0], sleep=sleep, fire_fn=fire_fn, max_fires=3)
    assert fired == ["ads-20261124T090000Z", "ads-20261124T100000Z", "ads-20261124T110000Z"]
    assert slept == [3600.0, 3600.0]
