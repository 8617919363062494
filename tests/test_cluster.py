"""Multi-node: a `ray.cluster_utils.Cluster` with GPU worker nodes (logical GPUs: `num_gpus=1` works on a
CPU machine, the actors fall back to CPU), generator actors on both of two, and a busy node removed mid-job.

A restarted Ray actor needs a free GPU to come back on (ray-project/ray#26991): on a fixed-size cluster with
none, the job waits until the autoscaler or an operator adds a node. The removal test therefore keeps one
spare GPU node, as a cluster with an autoscaling GPU group (cluster.yaml) has."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from conftest import make_spec, write_prompts
from promptmill.pipelines.batch.job import PreflightError, run_job
from promptmill.pipelines.spec import load_spec
from ray.cluster_utils import Cluster


@pytest.fixture
def cluster(request):
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 3})
    nodes = [c.add_node(num_cpus=1, num_gpus=1) for _ in range(request.param)]
    ray.init(address=c.address)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def _spec(tmp_path: Path, checkpoints, n: int, **resources) -> dict:
    write_prompts(tmp_path / "in.parquet", [f"a small red circle number {i}" for i in range(n)], [f"k{i}" for i in range(n)])
    spec = make_spec(str(tmp_path / "in.parquet"), str(tmp_path / "out"), checkpoints)
    spec["output"]["shared"] = True  # these nodes share this machine's disk
    spec["models"][0]["resources"] = {"num_gpus": 1, "num_cpus": 1, "batch_size": 4, **resources}
    spec["scoring"] = {"resources": {"batch_size": 4}}
    return spec


def _assert_complete(out: Path, n: int) -> list[dict]:
    rows = pq.read_table(out / "metadata").to_pylist()
    keys = [(r["id"], r["sample"]) for r in rows]
    assert len(keys) == len(set(keys)) == 2 * n  # nothing lost, nothing twice
    assert all((out / r["image_path"]).is_file() for r in rows)  # relative to the output
    return rows


@pytest.mark.slow  # 66 s: make chaos; two nodes run by default in the unshared-output test and test_submit's head
@pytest.mark.parametrize("cluster", [2], indirect=True)
def test_generator_actors_run_on_both_gpu_nodes(cluster, checkpoints, tmp_path):
    _, nodes = cluster
    res = run_job(load_spec(_spec(tmp_path, checkpoints, 100, actors=2, max_actors=2)))
    rows = _assert_complete(tmp_path / "out", 100)
    used = {r["node"] for r in rows}
    assert used == {n.node_id for n in nodes}, used  # one actor per GPU node; none on the CPU-only head
    assert {r["device"] for r in rows} == {"cpu"}  # logical GPUs: CUDA is absent, the CPU fallback ran
    assert res.images_written["gan"] >= 200


@pytest.mark.parametrize("cluster", [2], indirect=True)
def test_an_unshared_local_output_on_two_nodes_is_refused_before_anything_is_written(cluster, checkpoints, tmp_path):
    spec = _spec(tmp_path, checkpoints, 10)
    del spec["output"]["shared"]
    with pytest.raises(PreflightError, match=r"output.path .* local path, but the Ray cluster has 3 nodes.*"
                                             r"object-store URL.*output.shared: true"):
        run_job(load_spec(spec))
    assert not (tmp_path / "out").exists()


@pytest.mark.chaos  # a node killed mid-job: make chaos
@pytest.mark.parametrize("cluster", [3], indirect=True)
def test_removing_a_node_mid_job_loses_and_duplicates_nothing(cluster, checkpoints, tmp_path):
    c, nodes = cluster
    out = tmp_path / "out"
    removed: list[str] = []

    def remove_one() -> None:
        t0 = time.time()
        while time.time() - t0 < 120:
            parts = sorted((out / "_staging" / "metadata").glob("*.parquet"), key=lambda p: p.stat().st_mtime)
            if len(parts) >= 5:  # take away a node that is generating right now
                busy = pq.read_table(parts[-1], columns=["node"]).column(0)[0].as_py()
                victim = next(n for n in nodes if n.node_id == busy)
                c.remove_node(victim)
                removed.append(busy)
                return
            time.sleep(0.05)

    t = threading.Thread(target=remove_one)
    t.start()
    run_job(load_spec(_spec(tmp_path, checkpoints, 300, actors=2, max_actors=2)))
    t.join()
    assert removed, "the job ended before a node could be removed"
    rows = _assert_complete(out, 300)
    used = {r["node"] for r in rows}
    assert removed[0] in used and used - {removed[0]}  # it was busy, and the job was finished elsewhere


@pytest.mark.chaos  # four jobs and a three-node cluster: 228 s on the 2-core machine under load (make chaos)
def test_a_three_node_run_and_its_resume_give_the_single_node_output(checkpoints, tmp_path, monkeypatch):
    """The distributed plan (duplicate ids counted and the resume anti-joined on Ray Data, spread over a head and
    two worker nodes) writes the metadata rows and image bytes a one-node run writes: first 30 of 60 prompts, then
    all of them as a resume, against one full run on a one-node Ray."""
    from promptmill.pipelines.batch import aggregate

    monkeypatch.setattr(aggregate, "ROWS_PER_PARTITION", 16)  # hash shuffles of several partitions, not one task
    prompts, ids = [f"a small red circle number {i}" for i in range(60)], [f"k{i}" for i in range(60)]
    prompts[20], ids[10] = "", "k3"  # an empty prompt, and k3 twice (both within the first 30 rows)
    write_prompts(tmp_path / "in.parquet", prompts, ids)

    def spec(out: str, limit: int | None = None) -> dict:
        s = make_spec(str(tmp_path / "in.parquet"), str(tmp_path / out), checkpoints)
        s["output"]["shared"] = True  # these nodes share this machine's disk
        s["models"][0]["resources"] = {"batch_size": 4, "num_cpus": 1, "threads": 1}  # threads: the same float sums
        s["scoring"] = {"resources": {"batch_size": 4}}
        s["input"]["limit"] = limit
        return s

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        run_job(load_spec(spec("one")))
    finally:
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    for _ in range(2):
        c.add_node(num_cpus=2)
    ray.init(address=c.address)
    try:
        first = run_job(load_spec(spec("three", limit=30)))
        resumed = run_job(load_spec(spec("three")))
    finally:
        ray.shutdown()
        c.shutdown()
    assert sum(first.images_written.values()) == 2 * 27 and sum(resumed.images_written.values()) == 2 * 30

    def output(name: str) -> tuple[list[dict], dict]:
        out = tmp_path / name
        rows = sorted(pq.read_table(out / "metadata").drop_columns(["node"]).to_pylist(),
                      key=lambda r: (r["id"], r["sample"]))
        return rows, {r["image_path"]: (out / r["image_path"]).read_bytes() for r in rows}

    one, three = output("one"), output("three")
    assert len(one[0]) == 2 * 57 and [r["id"] for r in one[0]] == [r["id"] for r in three[0]]
    assert "k3" not in {r["id"] for r in one[0]}  # every copy of a duplicated id rejected
    floats = ("clip_score", "diversity", "judge_features", "clip_features")  # float sums follow the scoring batch
    for a, b in zip(one[0], three[0]):
        assert {k: v for k, v in a.items() if k not in floats} == {k: v for k, v in b.items() if k not in floats}
        for k in floats:
            assert np.allclose(np.asarray(a[k], float), np.asarray(b[k], float), atol=1e-3, equal_nan=True), k
    assert one[1] == three[1]
