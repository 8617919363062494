"""The generate job end to end on a real local Ray: outputs, rejects, rerun, resume, crashes, batch invariance."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import kill_session, make_spec, save_tiny, write_prompts
from promptmill.models.images import decode_image
from promptmill.models.local_cache import content_id
from promptmill.pipelines.batch.dry_run import dry_run
from promptmill.pipelines.batch.job import PHASES, run_job
from promptmill.pipelines.batch.read import plan_input, read_prompts
from promptmill.pipelines.spec import InputSpec, load_spec

ROOT = Path(__file__).resolve().parents[1]
GOOD = ["a small red circle on the left", "a large blue square above a green triangle", "big yellow triangle, top",
        "a purple diamond in the center", "ünïcødé \"quoted\" prompt, 42"]


def metadata(out: Path):
    return pq.read_table(out / "metadata").to_pylist()


def file_digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((out / "images").rglob("*")) if p.is_file() and p.name != "metadata.jsonl"}


def assert_exactly_once(out: Path, expected_keys: set[tuple]) -> list[dict]:
    rows = metadata(out)
    keys = [(r["model"], r["id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicate metadata rows"
    assert set(keys) == expected_keys
    for r in rows:
        assert (out / r["image_path"]).is_file(), r["image_path"]  # relative to the output
    images = [p for p in (out / "images").rglob("*") if p.is_file() and p.name != "metadata.jsonl"]  # imagefolder's
    assert len(images) == len(rows)  # no orphan images
    assert (out / "_SUCCESS").exists() and not (out / "_staging").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["images_total"].values()) == len(rows)  # the summary counts the table
    return rows


def test_end_to_end_local(ray_local, checkpoints, tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("PROMPTMILL_PROGRESS_S", "0")  # a progress line per write batch
    prompts = GOOD + ["", None, "x" * 1001, "dup one", "dup two", "unsafe"]
    ids = [f"p{i}" for i in range(len(GOOD))] + ["e", "n", "long", "dup", "dup", "a/b"]
    write_prompts(tmp_path / "in" / "part-0.parquet", prompts, ids, extra=list(range(len(ids))))
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints)
    recommends = save_tiny(str(tmp_path / "dalle"), "transformer", sampling={"temperature": 0.9, "top_k": 4})
    spec["models"].append({"name": "dalle", "family": "transformer", "checkpoint": recommends,
                           "images_per_prompt": 1, "sampling": {"guidance_scale": 2.0, "top_k": 8, "candidates": 2},
                           "resources": {"batch_size": 4}})
    spec["input"]["storage_options"] = {"secret": "hunter2"}
    plan = dry_run(load_spec(spec))  # --dry-run: the plan, nothing written
    assert not (tmp_path / "out").exists() and plan["output_state"] == "new"
    assert plan["input_rows"] == 11 and plan["accepted"] == 5 and sum(plan["rejected"].values()) == 6
    assert plan["models"]["gan"] == {"family": "gan", "images": 10, "in_output": 0, "to_draw": 10,
                                     "candidates_per_image": 1}
    assert plan["models"]["dalle"]["candidates_per_image"] == 2 and plan["models"]["dalle"]["rerank_by"] == "clip_score"
    with caplog.at_level("INFO", logger="promptmill.pipelines.batch.progress"):
        res = run_job(load_spec(spec))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress: ")]
    assert len(lines) >= 2 and lines[-1].startswith("progress: 15 / 15 images (100 %)") and "6 rejected" in lines[-1]
    out = tmp_path / "out"
    expected = {("gan", f"p{i}", s) for i in range(5) for s in (0, 1)} | {("dalle", f"p{i}", 0) for i in range(5)}
    rows = assert_exactly_once(out, expected)
    assert res.images_written == {"gan": 10, "dalle": 5}
    r0 = next(r for r in rows if r["id"] == "p4" and r["model"] == "gan")
    assert r0["prompt"] == GOOD[4] and r0["family"] == "gan" and r0["width"] == 32 and r0["image_format"] == "png"
    assert r0["checkpoint_id"] == content_id(checkpoints["gan"])  # what drew it, by content
    assert 0 <= r0["clip_score"] <= 100 and r0["prompt_match"] is None  # scored; out of the shapes grammar
    r1 = next(r for r in rows if r["id"] == "p4" and r["model"] == "gan" and r["sample"] == 1)
    assert r1["image_path"].startswith("images/gan/") and r1["image_path"].endswith("/p4-1.png")
    dalle = next(r for r in rows if r["model"] == "dalle")
    drawn = json.loads(dalle["sampling"])  # the checkpoint's recommendation under the spec's own, key by key
    assert (drawn["guidance_scale"], drawn["top_k"], drawn["temperature"]) == (2.0, 8, 0.9)
    assert (dalle["candidates"], dalle["rerank_by"]) == (2, "clip_score")
    assert decode_image((out / dalle["image_path"]).read_bytes()).shape == (32, 32, 3)
    rejected = pq.read_table(out / "rejected").to_pylist()
    assert {r["id"]: r["reason"] for r in rejected} == {
        "e": "empty_prompt", "n": "null_prompt", "long": "prompt_too_long", "dup": "duplicate_id", "a/b": "unsafe_id"}
    assert {r["extra"] for r in rejected} == {5, 6, 7, 8, 9, 10}  # original columns kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input_rows"] == 11 and summary["accepted"] == 5 and summary["rejected_total"] == 6
    assert summary["rejected"]["duplicate_id"] == 2 and summary["images_total"] == {"gan": 10, "dalle": 5}
    phases = summary["phases_s"]  # where the fixed cost goes; together about the run's wall time
    assert set(phases) == set(PHASES)
    # accounting, not speed: the phases partition the wall time (the summary is built a moment after it)
    assert all(v >= 0 for v in phases.values()) and abs(sum(phases.values()) - summary["wall_s"]) < 2
    assert summary["spec"]["input"]["storage_options"]["secret"] == "***"
    assert "hunter2" not in (out / "summary.json").read_text()
    # every image folder holds images of one model; names are deterministic
    assert all(p.parent.parent.name in ("gan", "dalle") for p in (out / "images").rglob("*.png"))

    # rerun: a no-op that touches nothing
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_job(load_spec(spec))
    assert again.skipped and again.images_written == {"gan": 0, "dalle": 0}
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    # more samples per prompt: only the missing ones are generated, old images keep their bytes; the finished
    # keys are anti-joined as a bulk input's are (hash partitions), beside the job's actor pools
    from promptmill.pipelines.batch import aggregate

    monkeypatch.setattr(aggregate, "ROWS_PER_PARTITION", 8)
    digests = file_digests(out)
    spec["models"][0]["images_per_prompt"] = 3
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    plan = dry_run(load_spec(spec))
    assert plan["output_state"] == "resume" and plan["models"]["gan"]["in_output"] == 10
    assert plan["models"]["gan"]["to_draw"] == 5 and plan["models"]["dalle"]["to_draw"] == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    more = run_job(load_spec(spec))
    assert more.images_written == {"gan": 5, "dalle": 0}
    assert_exactly_once(out, expected | {("gan", f"p{i}", 2) for i in range(5)})
    assert {k: v for k, v in file_digests(out).items() if k in digests} == digests


def test_batch_size_actor_count_and_where_scoring_runs_change_no_pixel_and_no_score(ray_local, checkpoints, tmp_path):
    """Run 0 scores in each generator actor (the default), run 1 in a scoring pool of its own."""
    write_prompts(tmp_path / "in.parquet", GOOD * 2, [f"r{i}" for i in range(10)])
    digests, scores = [], []
    for i, (bs, actors) in enumerate([(1, 1), (7, 2)]):
        spec = make_spec(str(tmp_path / "in.parquet"), str(tmp_path / f"out{i}"), checkpoints,
                         scoring={"pool": bool(i), "resources": {"batch_size": 5, "num_cpus": 0.5}})
        res = {"batch_size": bs, "actors": actors, "max_actors": actors, "num_cpus": 0.5}
        spec["models"].append({"name": "dalle", "family": "transformer", "checkpoint": checkpoints["transformer"],
                               "resources": res})
        spec["models"][0]["resources"] = res
        run_job(load_spec(spec))
        digests.append(file_digests(tmp_path / f"out{i}"))
        scores.append({r["image_path"]: (r["clip_score"], r["prompt_match"], r["judged"], r["geometry"])
                       for r in metadata(tmp_path / f"out{i}")})
    assert len(digests[0]) == 30 and digests[0] == digests[1]
    assert scores[0].keys() == scores[1].keys() and all(s[0] is not None and s[2] for s in scores[0].values())
    for k, (clip, *rest) in scores[0].items():  # CLIP's float sums differ in the 6th digit between batch sizes
        assert abs(clip - scores[1][k][0]) < 1e-3 and rest == list(scores[1][k][1:]), k


def test_concurrent_calls_per_actor_change_no_pixel_and_write_each_image_once(ray_local, checkpoints, tmp_path):
    """resources.concurrent_calls: the actor draws, scores and writes several batches at once (as on a GPU)."""
    write_prompts(tmp_path / "in.parquet", GOOD * 4, [f"r{i}" for i in range(20)])
    digests = []
    for i, calls in enumerate([1, 3]):
        spec = make_spec(str(tmp_path / "in.parquet"), str(tmp_path / f"out{i}"), checkpoints,
                         scoring={"pool": False})  # the generator actor scores and writes: all of it concurrent
        spec["models"][0]["resources"] = {"batch_size": 4, "concurrent_calls": calls}
        spec["models"][0]["precision"] = "bf16"
        run_job(load_spec(spec))
        rows = assert_exactly_once(tmp_path / f"out{i}", {("gan", f"r{j}", s) for j in range(20) for s in (0, 1)})
        assert all(r["clip_score"] is not None and json.loads(r["sampling"])["precision"] == "bf16" for r in rows)
        digests.append(file_digests(tmp_path / f"out{i}"))
    assert len(digests[0]) == 40 and digests[0] == digests[1]


def test_concurrent_calls_draw_on_one_device_thread_and_write_side_by_side(ray_local, checkpoints):
    """One call writes while the next draws: a write that waits for the other call's draw finishes only if drawing
    is done before writing; draws never overlap and all run on one thread (one OpenMP team, one CUDA stream)."""
    from promptmill.pipelines.batch.chain import ActorChain
    from promptmill.pipelines.batch.generate import GenerateStage
    from promptmill.pipelines.spec import ModelSpec, ScoringSpec

    both_drawn, drawn, inside, overlaps, drew_on = threading.Event(), [], [0], [], set()

    def write(batch):
        assert both_drawn.wait(timeout=30), "the other call never drew: drawing waited for this write"
        return {"images": [len(batch["id"])]}

    chain = ActorChain([(GenerateStage, {"model": ModelSpec(name="gan", family="gan", checkpoint=checkpoints["gan"]),
                                         "scoring": ScoringSpec(enabled=False)})], after=[write])
    stage = chain.on_device[0]
    draw = stage.draw

    def counted(batch):
        inside[0] += 1
        overlaps.append(inside[0])
        drew_on.add(threading.get_ident())
        try:
            time.sleep(0.05)
            return draw(batch)
        finally:
            inside[0] -= 1
            drawn.append(1)
            if len(drawn) == 2:
                both_drawn.set()

    stage.draw = counted
    batches = [{"id": [f"{c}{i}" for i in range(3)], "prompt": GOOD[:3], "seed": [1, 2, 3], "sample": [0, 0, 0]}
               for c in "ab"]
    results = [None, None]
    calls = [threading.Thread(target=lambda j=j: results.__setitem__(j, chain(batches[j]))) for j in range(2)]
    for t in calls:
        t.start()
    for t in calls:
        t.join(120)
    assert results == [{"images": [3]}, {"images": [3]}] and max(overlaps) == 1
    assert len(drew_on) == 1 and drew_on.isdisjoint(t.ident for t in calls)


def test_derived_ids_are_stable_and_limit_applies(ray_local, checkpoints, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", GOOD)
    write_prompts(tmp_path / "in" / "b.parquet", GOOD)  # same prompts, other file: other ids
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints)
    spec["input"]["id_column"] = None
    run_job(load_spec(spec))
    ids = {r["id"] for r in metadata(tmp_path / "out")}
    # an output started by one version resumes under the next only with the same ids: they are the file's path
    # and the row's position (md5 + splitmix64, Ray 2.60's include_row_hash); a Ray whose formula differs fails here
    assert ids == {derived_id(str(tmp_path / "in" / f), row) for f in ("a.parquet", "b.parquet") for row in range(5)}
    # row positions run on across a file's row groups
    pq.write_table(pa.table({"prompt": GOOD}), tmp_path / "groups.parquet", row_group_size=2)
    groups = InputSpec(path=str(tmp_path / "groups.parquet"), id_column=None)
    hashes = [r["row_hash"] for r in read_prompts(plan_input(groups), groups).take_all()]
    assert sorted(f"r{h:016x}" for h in hashes) == sorted(derived_id(str(tmp_path / "groups.parquet"), r) for r in range(5))
    spec["output"]["path"] = str(tmp_path / "out2")
    spec["input"]["limit"] = 3
    res = run_job(load_spec(spec))
    assert res.input_rows == 3 and {r["id"] for r in metadata(tmp_path / "out2")} < ids



def derived_id(path: str, row: int) -> str:
    mask = 2**64 - 1
    h = (int.from_bytes(hashlib.md5(path.encode()).digest()[:8], "little") + row) & mask
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & mask
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & mask
    return f"r{h ^ (h >> 31):016x}"


def test_limit_reads_the_first_rows_in_file_order(ray_local, tmp_path):
    """`input.limit` across files: the first rows of the first files, the same on every read (Ray Data's limit
    kept whichever blocks came first: a rerun or resume chose other prompts), with the ids a full read gives."""
    for name in "abc":
        write_prompts(tmp_path / "in" / f"{name}.parquet", [f"{p} ({name})" for p in GOOD])
    full = InputSpec(path=str(tmp_path / "in"), id_column=None)
    hashes = {r["prompt"]: r["row_hash"] for r in read_prompts(plan_input(full), full).take_all()}
    spec = InputSpec(path=str(tmp_path / "in"), id_column=None, limit=7)
    plan = plan_input(spec)
    assert plan.rows == 7 and plan.head is not None and plan.head[1] == 2
    want = {f"{p} (a)" for p in GOOD} | {f"{p} (b)" for p in GOOD[:2]}
    for _ in range(3):
        rows = read_prompts(plan_input(spec), spec).take_all()
        assert {r["prompt"] for r in rows} == want
        assert all(r["row_hash"] == hashes[r["prompt"]] for r in rows)  # derived ids as a full run derives them
    for name, first in (("a", 0), ("b", 5), ("c", 0)):  # c repeats a's ids, past the limit
        write_prompts(tmp_path / "ids" / f"{name}.parquet", GOOD, [f"r{first + i}" for i in range(5)])
    assert plan_input(InputSpec(path=str(tmp_path / "ids"), id_column="id", limit=7)).duplicate_ids == set()
    assert plan_input(InputSpec(path=str(tmp_path / "ids"), id_column="id")).duplicate_ids == {f"r{i}" for i in range(5)}

def test_pools_that_cannot_fit_are_refused(ray_local, checkpoints, tmp_path):
    from promptmill.pipelines.batch.job import PreflightError

    write_prompts(tmp_path / "in.parquet", GOOD, [f"r{i}" for i in range(5)])
    spec = make_spec(str(tmp_path / "in.parquet"), str(tmp_path / "out"), checkpoints)
    spec["models"][0]["resources"] = {"actors": 4, "max_actors": 4}
    with pytest.raises(PreflightError, match="need 5 CPUs at minimum .* has 4"):  # 4 actors + reading/writing
        run_job(load_spec(spec))
    spec["models"][0]["resources"] = {"actors": 2, "max_actors": 2}
    spec["scoring"] = {"pool": True, "resources": {"actors": 2, "max_actors": 2}}  # a scoring pool counts too
    with pytest.raises(PreflightError, match="need 5 CPUs at minimum .* has 4"):
        run_job(load_spec(spec))


def _run_cli(spec: dict, tmp_path: Path) -> subprocess.Popen:
    p = tmp_path / f"spec-{time.time_ns()}.yaml"
    p.write_text(yaml.safe_dump(spec))
    return subprocess.Popen([sys.executable, "-m", "promptmill.jobs.cli", "generate", str(p)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _wait_for_parts(out: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while len(list((out / "_staging" / "metadata").glob("*.parquet"))) < n:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() - t0 < timeout, "job made no progress"
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_driver_then_resume_is_exactly_once(checkpoints, tmp_path):
    """SIGKILL the whole driver (and its embedded Ray) mid-job, rerun, and count."""
    n = 120
    write_prompts(tmp_path / "in.parquet", [f"a red circle number {i}" for i in range(n)], [f"k{i}" for i in range(n)])
    out = tmp_path / "out"
    spec = make_spec(str(tmp_path / "in.parquet"), str(out), checkpoints)
    spec["models"][0]["resources"] = {"batch_size": 4}
    spec["scoring"] = {"resources": {"batch_size": 4}}  # small write batches: the kill lands mid-job
    proc = _run_cli(spec, tmp_path)
    _wait_for_parts(out, 5, proc)
    kill_session(proc.pid)
    proc.wait()
    staged_before = len(list((out / "_staging" / "metadata").glob("*.parquet")))
    assert staged_before >= 5 and not (out / "_SUCCESS").exists()
    proc = _run_cli(spec, tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    rows = assert_exactly_once(out, {("gan", f"k{i}", s) for i in range(n) for s in (0, 1)})
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_written_this_run"]["gan"] < 2 * n  # the first run's work was kept
    assert len(rows) == 2 * n
    # pixel for pixel against a clean run with another batch size and one torch thread per actor: the bound README
    # states (float reductions follow the threads and the batch: 1/255 in a few pixels, benchmarks/pixel_exactness.py)
    clean = tmp_path / "clean"  # its first 40 prompts: the comparison needs the same ids, not all of them
    spec2 = make_spec(str(tmp_path / "in.parquet"), str(clean), checkpoints)
    spec2["input"]["limit"] = 40
    spec2["models"][0]["resources"] = {"batch_size": 16, "threads": 1}
    spec2["scoring"] = {"resources": {"batch_size": 16}}
    proc = _run_cli(spec2, tmp_path)
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    resumed = {(r["id"], r["sample"]): decode_image((out / r["image_path"]).read_bytes()).astype(int) for r in rows}
    fresh = {(r["id"], r["sample"]): decode_image((clean / r["image_path"]).read_bytes()).astype(int)
             for r in pq.read_table(clean / "metadata").to_pylist()}
    assert len(fresh) == 80 and fresh.keys() <= resumed.keys()
    diffs = [np.abs(resumed[k] - fresh[k]) for k in fresh]
    assert max(int(d.max()) for d in diffs) <= 1
    assert sum(int((d.max(-1) > 0).sum()) for d in diffs) <= 0.05 * len(diffs)  # pixels differing, across images


@pytest.mark.slow
def test_killed_generator_actor_loses_and_duplicates_nothing(ray_local, checkpoints, tmp_path):
    n = 300
    write_prompts(tmp_path / "in.parquet", [f"a blue square number {i}" for i in range(n)], [f"k{i}" for i in range(n)])
    out = tmp_path / "out"
    spec = make_spec(str(tmp_path / "in.parquet"), str(out), checkpoints)
    spec["models"][0]["resources"] = {"batch_size": 4}
    spec["scoring"] = {"resources": {"batch_size": 4}}
    killed: list[int] = []

    def kill_one_actor() -> None:
        t0 = time.time()
        while time.time() - t0 < 120:
            parts = list((out / "_staging" / "metadata").glob("*.parquet"))
            actors = [p for p in psutil.process_iter(["cmdline"])
                      if "GenerateStage" in " ".join(p.info["cmdline"] or [])]
            if len(parts) >= 3 and actors:
                os.kill(actors[0].pid, signal.SIGKILL)
                killed.append(actors[0].pid)
                return
            time.sleep(0.05)

    t = threading.Thread(target=kill_one_actor)
    t.start()
    res = run_job(load_spec(spec))
    t.join()
    assert killed, "no generator actor was found to kill"
    assert res.images_written["gan"] >= 2 * n  # redone batches may be counted twice in staging
    assert_exactly_once(out, {("gan", f"k{i}", s) for i in range(n) for s in (0, 1)})


def test_an_embedded_ray_runs_work_and_its_exit_leaves_no_process():
    """ensure_ray starts an embedded Ray through public APIs only; it runs a task, and the interpreter's exit (our
    hook, then Ray's) leaves none of its processes behind (GCS, raylet, monitor, dashboard agents, workers)."""
    code = """
import json, psutil, ray
from promptmill.pipelines.ray_cluster import ensure_ray
ensure_ray(2)
task = ray.get(ray.remote(lambda: 7).remote())
every = [p.pid for p in psutil.Process().children(recursive=True)]
print(json.dumps({"every": every, "task": task}))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["task"] == 7 and len(out["every"]) >= 2  # at least the GCS and the raylet
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) for p in out["every"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in out["every"] if psutil.pid_exists(p)]  # exit left nothing orphaned
