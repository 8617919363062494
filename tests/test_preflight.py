"""Bad input found before any work: exit code 2, one message naming the file/field, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_spec, write_prompts
from promptmill.jobs.cli import main


def run_cli(spec: dict, tmp_path: Path, *sets: str) -> int:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    args = ["generate", str(p)]
    for s in sets:
        args += ["--set", s]
    return main(args)


@pytest.fixture
def good(tmp_path, checkpoints):
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", "a blue square"], ["a", "b"])
    return make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints)


def expect_exit_2(spec, tmp_path, capsys, needle: str, *sets: str) -> str:
    assert run_cli(spec, tmp_path, *sets) == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert not (tmp_path / "out").exists(), "preflight wrote output"
    return err


def test_missing_prompt_column(good, tmp_path, capsys):
    expect_exit_2(good, tmp_path, capsys, "missing prompt column 'text'", "input.prompt_column=text")


def test_wrong_column_type(good, tmp_path, capsys):
    pq.write_table(pa.table({"id": ["x"], "prompt": [3]}), tmp_path / "in" / "b.parquet")
    err = expect_exit_2(good, tmp_path, capsys, "prompt column 'prompt' has type int64")
    assert "b.parquet" in err


def test_corrupt_parquet_among_good_ones(good, tmp_path, capsys):
    write_prompts(tmp_path / "in" / "c.parquet", ["fine"], ["c"])
    good_bytes = (tmp_path / "in" / "c.parquet").read_bytes()
    (tmp_path / "in" / "b.parquet").write_bytes(good_bytes[: len(good_bytes) // 2])  # truncated
    err = expect_exit_2(good, tmp_path, capsys, "not a readable Parquet file")
    assert "b.parquet" in err and "c.parquet" not in err


def test_missing_input_and_empty_dir(good, tmp_path, capsys):
    expect_exit_2(good, tmp_path, capsys, "no such file or directory", f"input.path={tmp_path}/nope")
    (tmp_path / "empty").mkdir()
    expect_exit_2(good, tmp_path, capsys, "no .parquet files", f"input.path={tmp_path}/empty")


def test_unknown_family_is_a_spec_error(good, tmp_path, capsys):
    expect_exit_2(good, tmp_path, capsys, "models[0].family", "models.0.family=diffusion")


def test_missing_and_corrupt_checkpoint(good, tmp_path, capsys, checkpoints):
    expect_exit_2(good, tmp_path, capsys, "models[0] (gan).checkpoint", f"models.0.checkpoint={tmp_path}/none")
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["gan"], bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    expect_exit_2(good, tmp_path, capsys, "model.safetensors is corrupt", f"models.0.checkpoint={bad}")
    (bad / "config.json").write_text("{not json")
    expect_exit_2(good, tmp_path, capsys, "config.json is not valid JSON", f"models.0.checkpoint={bad}")


def test_family_mismatch_and_bad_sampling(good, tmp_path, capsys, checkpoints):
    expect_exit_2(good, tmp_path, capsys, "checkpoint", f"models.0.checkpoint={checkpoints['transformer']}")
    expect_exit_2(good, tmp_path, capsys, "models[0] (gan).sampling", "models.0.sampling={top_k: 5}")


def test_output_of_a_different_spec_is_refused(good, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "_spec.json").write_text(json.dumps(
        {"seed": 99, "image_format": "png", "models": {}}))
    assert run_cli(good, tmp_path) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_spec.json"]


def test_a_local_output_is_refused_where_other_nodes_would_write_it(good):
    """The two-node case runs on a real cluster in test_cluster.py; here the rule itself, on ray.nodes() records."""
    from promptmill.pipelines.batch.preflight import PreflightError, check_output_reachable
    from promptmill.pipelines.spec import load_spec

    def node(cpu: float, head: bool) -> dict:
        return {"Alive": True, "Resources": {**({"CPU": cpu} if cpu else {}), **({"node:__internal_head__": 1.0}
                                                                                 if head else {})}}

    spec = load_spec(good)
    check_output_reachable(spec, [node(4, True)])  # one node that does the work: fine
    check_output_reachable(spec, [node(4, True), {**node(8, False), "Alive": False}])  # a dead node is no node
    with pytest.raises(PreflightError, match="a head with no CPUs"):  # cluster.yaml's head: workers come later
        check_output_reachable(spec, [node(0, True)])
    with pytest.raises(PreflightError, match="2 nodes"):
        check_output_reachable(spec, [node(0, True), node(8, False)])
    check_output_reachable(load_spec({**good, "output": {**good["output"], "shared": True}}), [node(0, True)])
    check_output_reachable(load_spec({**good, "output": {"path": "s3://bucket/out"}}), [node(0, True), node(8, False)])


def test_weights_replaced_in_place_are_another_model_for_an_existing_output(good, tmp_path):
    """The fingerprint holds each checkpoint's content id: new weights under the old path are refused, not mixed in."""
    from promptmill.models.local_cache import content_id
    from promptmill.pipelines.batch.preflight import PreflightError, _check_fingerprint, fingerprint
    from promptmill.pipelines.spec import load_spec
    from safetensors.torch import load_file, save_file

    ckpt = tmp_path / "gan"
    shutil.copytree(good["models"][0]["checkpoint"], ckpt)
    spec = load_spec({**good, "models": [{**good["models"][0], "checkpoint": str(ckpt)}]})
    before = fingerprint(spec)
    assert before["models"]["gan"]["checkpoint_id"] == content_id(str(ckpt))
    assert before["scoring"]["judge_id"] == content_id(spec.scoring.judge)
    _check_fingerprint(spec, before, allow_subset=False)  # same weights: fine

    weights = next(ckpt.glob("*.safetensors"))
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] + 1e-3  # retrained: same names, same shapes, other values
    save_file(tensors, weights)
    assert fingerprint(spec)["models"]["gan"]["checkpoint_id"] != before["models"]["gan"]["checkpoint_id"]
    with pytest.raises(PreflightError, match="already holds model 'gan' with other settings"):
        _check_fingerprint(spec, before, allow_subset=False)
    older = json.loads(json.dumps(before))  # an output written before content ids: compared by path as then
    del older["models"]["gan"]["checkpoint_id"], older["scoring"]["clip_id"], older["scoring"]["judge_id"]
    _check_fingerprint(spec, older, allow_subset=False)


def test_precision_is_part_of_an_outputs_settings(good):
    """bf16 draws other pixels: a rerun into an fp32 output at bf16 is refused, and back. fp32 adds nothing to the
    fingerprint, so outputs written before `precision` existed resume as they did."""
    from promptmill.pipelines.batch.preflight import PreflightError, _check_fingerprint, fingerprint
    from promptmill.pipelines.spec import load_spec

    full = load_spec(good)
    half = load_spec({**good, "models": [{**good["models"][0], "precision": "bf16"}]})
    assert "precision" not in fingerprint(full)["models"]["gan"]
    assert fingerprint(half)["models"]["gan"]["precision"] == "bf16"
    for spec, before in ((half, fingerprint(full)), (full, fingerprint(half))):
        with pytest.raises(PreflightError, match="already holds model 'gan' with other settings"):
            _check_fingerprint(spec, before, allow_subset=False)
    _check_fingerprint(half, fingerprint(half), allow_subset=False)


def test_actor_threads_follow_the_cpus_held_or_share_this_machine():
    from promptmill.pipelines.batch.sizing import actor_threads, pool_cpus, scoring_in_pool
    from promptmill.pipelines.spec import Resources, load_spec

    assert actor_threads(Resources(num_cpus=4), 3, None) == 4  # a cluster: the CPUs Ray reserved for it
    assert actor_threads(Resources(num_cpus=0.5), 3, None) == 1
    assert actor_threads(Resources(), 1, 16) == 16  # alone on this machine: every core (Ray would give it 1)
    assert actor_threads(Resources(), 3, 16) == 5 and actor_threads(Resources(), 40, 16) == 1
    assert actor_threads(Resources(threads=3), 1, 16) == 3  # said explicitly
    spec = load_spec({"name": "t", "input": {"path": "in"}, "output": {"path": "out"},
                      "models": [{"name": "gan", "family": "gan", "checkpoint": "ck"}]})
    assert scoring_in_pool(spec, 3) is True and pool_cpus(spec, scoring_in_pool(spec, 3)) == 2
    fitted = scoring_in_pool(spec, 2)  # a 2-CPU `ray start --head`: scoring moves into the generator actor
    assert fitted is False and pool_cpus(spec, fitted) + 1 == 2
    said = load_spec({**spec.model_dump(), "scoring": {"pool": False}})
    assert scoring_in_pool(said, 64) is False  # said explicitly: kept
    gpu = load_spec({**spec.model_dump(), "models": [{"name": "gan", "family": "gan", "checkpoint": "ck",
                                                      "resources": {"num_gpus": 1}}]})
    assert scoring_in_pool(gpu, 16) is True  # the CPU-bound geometry check overlaps a GPU's drawing


def test_a_cpu_pool_sized_by_the_job_splits_into_single_threaded_actors_that_fit_in_memory():
    from promptmill.pipelines.batch.sizing import ACTOR_PROCESS_BYTES, MIN_ROWS_PER_ACTOR, cpu_actors
    from promptmill.pipelines.spec import Resources

    gib, small = 1 << 30, 5 << 20
    assert cpu_actors(Resources(batch_size=64), 1, 2, small, 24 * gib) == 2  # this machine: one per core
    assert cpu_actors(Resources(), 1, 16, small, 24 * gib) == 10  # a quarter of 24 GiB / (600 MiB + the model)
    assert cpu_actors(Resources(), 2, 16, small, 256 * gib) == 16  # beside another pool: one per core as well
    assert cpu_actors(Resources(), 2, 16, small, 24 * gib) == 5  # the pools share the quarter of the memory
    assert cpu_actors(Resources(), 1, 16, 5 * gib, 32 * gib) == 1  # two copies of a 5 GB model do not fit
    assert cpu_actors(Resources(), 1, 16, 3 * gib, 64 * gib) == (16 * gib) // (3 * gib + ACTOR_PROCESS_BYTES)
    for sized in ({"threads": 2}, {"actors": 1}, {"max_actors": 3}, {"num_gpus": 1}):  # the spec said: kept
        assert cpu_actors(Resources(**sized), 1, 16, small, 24 * gib) == 1, sized
    assert cpu_actors(Resources(), 1, None, small, 24 * gib) == 1  # a cluster: the CPUs Ray reserved
    assert cpu_actors(Resources(), 1, 16, None, 24 * gib) == 1  # a checkpoint that could not be sized
    assert cpu_actors(Resources(), 1, 1, small, 24 * gib) == 1  # one core: nothing to split
    # what the pool has to do: each actor must get MIN_ROWS_PER_ACTOR images to pay for its start
    assert cpu_actors(Resources(), 1, 2, small, 24 * gib, rows=2 * MIN_ROWS_PER_ACTOR) == 2
    assert cpu_actors(Resources(), 1, 2, small, 24 * gib, rows=2 * MIN_ROWS_PER_ACTOR - 1) == 1
    assert cpu_actors(Resources(), 1, 16, small, 256 * gib, rows=5 * MIN_ROWS_PER_ACTOR) == 5


def test_the_scoring_pool_sizes_by_the_same_rule_from_its_clip_and_judge(tmp_path):
    from promptmill.pipelines.batch.sizing import checkpoint_bytes, scoring_pool_size
    from promptmill.pipelines.spec import Resources, ScoringSpec

    scoring = ScoringSpec()  # the shipped CLIP and judge, a few MB
    assert checkpoint_bytes(scoring.clip, scoring.judge, storage_options={}) > checkpoint_bytes(
        scoring.clip, storage_options={}) > 0
    assert checkpoint_bytes(str(tmp_path / "missing"), storage_options={}) is None
    alone = scoring_pool_size(scoring, 1, 2)  # `promptmill score` on 2 cores: two single-threaded actors
    assert (alone.min_actors, alone.max_actors, alone.num_cpus, alone.threads) == (1, 2, 0.5, 1)
    beside = scoring_pool_size(scoring, 2, 2)  # the job's, beside a generator pool: may grow to a core each too
    assert (beside.min_actors, beside.max_actors, beside.num_cpus, beside.threads) == (1, 2, 0.5, 1)
    few = scoring_pool_size(scoring, 1, 2, rows=512)  # a small job: one actor, the 2 cores as threads
    assert (few.max_actors, few.num_cpus, few.threads) == (1, 1, 2)
    said = scoring_pool_size(ScoringSpec(resources=Resources(actors=1, max_actors=1)), 1, 2)  # --actors 1
    assert (said.max_actors, said.num_cpus, said.threads) == (1, 1, 2)


def test_the_generate_pool_grows_to_single_threaded_actors_holding_the_cpus_of_one(ray_local, checkpoints,
                                                                                    tmp_path):
    """What the job asks Ray Data for: the default GAN pool on this machine starts one single-threaded actor and
    may grow to one per core, the pool at its largest holding the one CPU a default actor holds, and so may a
    scoring pool beside it; a small job keeps one actor with the cores as threads; said sizes are kept."""
    import ray
    from promptmill.pipelines.batch.job import _images
    from promptmill.pipelines.batch.sizing import make_plan, scoring_in_pool
    from promptmill.pipelines.ray_cluster import local_cores
    from promptmill.pipelines.spec import load_spec

    cores = local_cores()
    if cores is None or cores < 2:
        pytest.skip("needs a machine with 2 cores or more, alone")

    def generate_op(resources: dict, scoring: dict | None = None, images: int = 8192):
        spec = load_spec(make_spec("in", str(tmp_path / "out"), checkpoints, scoring=scoring or {"enabled": False},
                                   models=[{"name": "gan", "family": "gan", "checkpoint": checkpoints["gan"],
                                            "resources": resources}]))
        plan = make_plan(spec, scoring_in_pool(spec, 64), cores, {"gan": images})
        op = _images(spec, ray.data.range(1), frozenset(), {"models": {"gan": {"checkpoint_id": "x"}}}, plan)
        return op._logical_plan.dag

    def threads(op) -> int:  # the stage's own (ActorChain builds it in the actor)
        return op.fn_constructor_kwargs["on_device"][0][1]["threads"]

    op = generate_op({"batch_size": 8})
    assert op.compute.min_size == 1 and 2 <= op.compute.max_size <= cores  # fewer where memory is short
    assert op.ray_remote_args["num_cpus"] * op.compute.max_size == pytest.approx(1)
    assert threads(op) == 1
    op = generate_op({"batch_size": 8, "threads": 2})
    assert (op.compute.min_size, op.compute.max_size, op.ray_remote_args["num_cpus"]) == (1, 1, 1)
    assert threads(op) == 2
    op = generate_op({"batch_size": 8}, images=512)  # a small job: not worth a second actor's start
    assert (op.compute.min_size, op.compute.max_size, op.ray_remote_args["num_cpus"]) == (1, 1, 1)
    assert threads(op) == cores
    score = generate_op({"batch_size": 8}, scoring={"enabled": True, "pool": True})  # two pools, each the same
    for op in (score.input_dependencies[0], score):  # ScoreStage after GenerateStage
        assert op.compute.min_size == 1 and 2 <= op.compute.max_size <= cores, op
        assert op.ray_remote_args["num_cpus"] * op.compute.max_size == pytest.approx(1)
        assert threads(op) == 1


def test_files_are_written_by_the_actors_on_cpu_and_by_tasks_beside_a_gpu_model_unless_said():
    from promptmill.pipelines.batch.sizing import writes_in_actors
    from promptmill.pipelines.spec import load_spec

    def spec(num_gpus: float = 0, **output) -> object:
        return load_spec({"name": "t", "input": {"path": "in"}, "output": {"path": "out", **output},
                          "models": [{"name": "a", "family": "gan", "checkpoint": "ck"},
                                     {"name": "b", "family": "gan", "checkpoint": "ck",
                                      "resources": {"num_gpus": num_gpus}}]})

    assert writes_in_actors(spec()) is True  # CPU generators: no pixels through the object store
    assert writes_in_actors(spec(num_gpus=0.5)) is False  # one GPU model among CPU ones: write tasks
    assert writes_in_actors(spec(num_gpus=1, write_in="actors")) is True  # said explicitly
    assert writes_in_actors(spec(write_in="tasks")) is False
    for fmt in ("webdataset", "parquet"):  # they gather shard_size rows per tar / part: always tasks
        assert writes_in_actors(spec(format=fmt, write_in="actors")) is False


def test_actor_threads_are_set_on_the_thread_that_runs_the_batches(ray_local):
    """Ray Data builds a pool stage on one thread and calls it on another; the torch thread count must be the
    job's on the calling thread, and the building thread must not hold a team of its own (libgomp then counts
    more threads than cores and stops spinning: benchmarks/actor_threads.py)."""
    import threading

    import ray
    import torch
    from promptmill.pipelines.batch.threads import ActorThreads

    class Probe:  # defined here: Ray pickles a local class by value (the tests folder is not on the workers' path)
        def __init__(self, n: int) -> None:
            self.threads = ActorThreads(n)
            self.built = (threading.get_ident(), torch.get_num_threads())

        def __call__(self, batch: dict) -> dict:
            self.threads.on_call()
            n = len(batch["id"])
            batch["built_on"], batch["built_threads"] = [self.built[0]] * n, [self.built[1]] * n
            batch["called_on"], batch["called_threads"] = [threading.get_ident()] * n, [torch.get_num_threads()] * n
            return batch

    rows = ray.data.range(64, override_num_blocks=4).map_batches(
        Probe, fn_constructor_args=(2,), compute=ray.data.ActorPoolStrategy(size=1), batch_size=16,
        num_cpus=1).take_all()
    assert {r["called_threads"] for r in rows} == {2}  # Ray gave this num_cpus=1 actor OMP_NUM_THREADS=1
    assert {r["built_threads"] for r in rows} == {1}
    assert all(r["built_on"] != r["called_on"] for r in rows)  # why it matters: two threads, two teams


def test_preflight_checks_a_checkpoint_without_reading_its_weights(good, tmp_path, capsys, monkeypatch, checkpoints):
    """Config, names, shapes and the file's length are checked from config.json and the safetensors header; the
    driver does not load (or download) the weights its actors will load."""
    import promptmill.models.checkpoint as checkpoint
    from promptmill.pipelines.batch.preflight import PreflightError, check_models
    from promptmill.pipelines.spec import load_spec

    def no_weights(*_a, **_k):
        raise AssertionError("preflight read the weights")

    monkeypatch.setattr(checkpoint, "st_load", no_weights)
    good = {**good, "scoring": {"enabled": False}}  # the scorers (a few MB) are loaded: their own check
    check_models(load_spec(good))
    bad = tmp_path / "cut"
    shutil.copytree(checkpoints["gan"], bad)
    weights = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(weights[:-100])  # a truncated upload: header intact, data short
    with pytest.raises(PreflightError, match=r"models\[0\] \(gan\).checkpoint: .*model.safetensors is corrupt "
                                             r"\(its header describes \d+ bytes, the file has \d+\)"):
        check_models(load_spec({**good, "models": [{**good["models"][0], "checkpoint": str(bad)}]}))


def test_the_driver_imports_torch_only_for_its_model_checks(good, tmp_path):
    """The job imports torch (1.1 s of a core) on a thread while Ray starts: the CLI, the job module and the checks
    of input and output before it must not import it first (a module-level `import torch` on that path would)."""
    import subprocess
    import sys

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({**good, "scoring": {"enabled": True}}))
    code = f"""
import sys
import promptmill.jobs.cli, promptmill.jobs.generate
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.batch.preflight import check_models, preflight
from promptmill.pipelines.spec import load_spec
spec = load_spec({str(spec)!r})
preflight(spec)
before = "torch" in sys.modules
check_models(spec)
print(before, "torch" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["False", "True"]
