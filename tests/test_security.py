"""Safety findings of issue 14, one test each: hostile or broken inputs, secrets, other people's data, one writer.

Each test failed on the code before its fix (the finding's reproduction, kept as a test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import make_spec, write_prompts
from promptmill.jobs.cli import main
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.spec import SpecError, load_spec


def _cli(spec: dict, tmp_path: Path, *args: str) -> int:
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return main(["generate", str(p), *args])


# ---------------------------------------------------------------- 10-13: hostile or broken inputs

@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_a_128_character_id_writes_in_every_format(ray_local, checkpoints, tmp_path, fmt):
    """USTAR tar names stop at 100 characters: a valid 128-character id failed every WebDataset write."""
    long_id = "x" * 128
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", "a blue square"], [long_id, "short"])
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints, output={"path": str(tmp_path / "out"),
                                                                                      "format": fmt})
    res = run_job(load_spec(spec))
    assert res.images_total == {"gan": 4}
    from promptmill.pipelines.runs.results import Run

    run = Run(str(tmp_path / "out"))
    rows = run.rows("gan")
    assert sorted(set(rows.column("id").to_pylist())) == ["short", long_id]
    assert [im.shape for im in run.images(rows)] == [(32, 32, 3)] * 4  # every image reads back, the long id's included


def test_names_that_end_in_a_newline_are_not_path_safe(checkpoints, tmp_path):
    from promptmill.pipelines.batch.validate import REASON, validate_batch
    from promptmill.pipelines.spec import InputSpec

    out = validate_batch(pa.table({"id": ["ok\n", "ok"], "prompt": ["a", "b"]}), InputSpec(path="x", id_column="id"),
                         set())
    assert out[REASON].to_pylist() == ["unsafe_id", None]
    spec = make_spec("in", "out", checkpoints)
    spec["models"][0]["name"] = "gan\n"
    with pytest.raises(SpecError, match="not path-safe"):
        load_spec(spec)


def _invalid_utf8_strings(values: list[bytes]) -> pa.Array:
    """A *string* column holding bytes that are not UTF-8, as a foreign writer can produce (Parquet does not check)."""
    return pa.array(values, pa.binary()).view(pa.string())


def test_invalid_utf8_in_a_string_column_is_a_rejected_row(ray_local, checkpoints, tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": ["a", "b", "c"], "prompt": _invalid_utf8_strings([b"a red circle", b"\xff\xfe bad",
                                                                                      b"a blue square"])}),
                   tmp_path / "in" / "a.parquet")
    res = run_job(load_spec(make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints)))
    assert res.rejected == {"invalid_utf8": 1} and res.images_total == {"gan": 4}
    rejected = pq.read_table(tmp_path / "out" / "rejected")
    assert rejected.column("id").to_pylist() == ["b"] and rejected.column("reason").to_pylist() == ["invalid_utf8"]


def test_input_files_with_different_columns_are_refused_naming_both(checkpoints, tmp_path, capsys):
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle"], ["a"])
    write_prompts(tmp_path / "in" / "b.parquet", ["a blue square"], ["b"], sku=["s1"])
    assert _cli(make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints), tmp_path) == 2
    err = capsys.readouterr().err
    assert "disagree on their columns" in err and "a.parquet" in err and "b.parquet" in err and "sku" in err
    assert not (tmp_path / "out").exists()


def test_bounds_and_strict_types(checkpoints, tmp_path, capsys):
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle"], ["a"])
    good = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints)
    # an embedded Ray is not asked for hundreds of processes on a small machine (own process: no Ray running yet)
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(good))
    run = subprocess.run([sys.executable, "-m", "promptmill.jobs.cli", "generate", str(p),
                          "--set", "models.0.resources.actors=400", "--set", "models.0.resources.max_actors=400"],
                         capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert run.returncode == 2 and "an embedded Ray on this machine" in run.stderr, run.stderr[-2000:]
    for override, needle in (("models.0.resources.batch_size=100000", "batch_size"),
                             ("input.max_prompt_chars=10000000", "max_prompt_chars"),
                             ("models.0.sampling={candidates: 64}", "candidates x resources.batch_size"),
                             ('models.0.images_per_prompt="3"', "images_per_prompt")):
        spec = load_spec_error(good, override)
        assert needle in spec, (override, spec)
    assert not (tmp_path / "out").exists()


def load_spec_error(spec: dict, override: str) -> str:
    with pytest.raises(SpecError) as e:
        load_spec(spec, [override] if "candidates" not in override else [override, "models.0.resources.batch_size=4096"])
    return str(e.value)


@pytest.mark.parametrize("template", ["{name:>50000000}", "{name[0]}", "{name.upper}", "{name!r}"])
def test_schedule_templates_take_plain_column_names_only(template):
    from promptmill.pipelines.ops.schedule import ScheduleSpec

    data = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "schedule.yaml").read_text())
    data["templates"] = [template]
    with pytest.raises(Exception, match="placeholders must be plain"):
        ScheduleSpec.model_validate(data)


def test_spec_errors_do_not_echo_secrets(checkpoints):
    spec = make_spec("in", "out", checkpoints)
    spec["input"]["storage_option"] = {"key": "AKIAPLANTED", "secret": "planted-secret-value"}  # the typo
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    assert "storage_option" in str(e.value)
    assert "planted-secret-value" not in str(e.value) and "AKIAPLANTED" not in str(e.value)
    spec = make_spec("in", "out", checkpoints, scoring={"enabled": True, "clip": None, "judge": None,
                                                        "storage_options": {"secret": "planted-secret-value"}})
    spec["models"][0]["sampling"] = {"candidates": 4}  # a spec-level error: its input is the whole spec
    with pytest.raises(SpecError) as e:
        load_spec(spec)
    assert "candidates" in str(e.value) and "planted-secret-value" not in str(e.value)


def test_redact_covers_keys_urls_and_signatures():
    from promptmill.pipelines.redaction import redact

    planted = {
        "storage_options": {"key": "AKIA1", "secret": "s3cr3t", "client_kwargs": {"headers": {"Authorization": "Bearer t0k"}}},
        "connection_string": "DefaultEndpointsProtocol=https;AccountKey=azkey",
        "checkpoint": "s3://user:pa55@bucket/ckpt",
        "presigned": "https://bucket.s3.amazonaws.com/k?X-Amz-Credential=AKIA2&X-Amz-Signature=abc123&x=1",
        "sas": "https://acct.blob.core.windows.net/c/b?sv=2020&sig=azsig&se=2030",
        "list": ["https://u:p@host/x", "plain"],
    }
    text = json.dumps(redact(planted))
    for secret in ("AKIA1", "s3cr3t", "t0k", "azkey", "pa55", "AKIA2", "abc123", "azsig"):
        assert secret not in text, (secret, text)
    r = redact(planted)
    assert r["checkpoint"] == "s3://***@bucket/ckpt" and r["list"][1] == "plain"
    assert "x=1" in r["presigned"] and "sv=2020" in r["sas"]  # what is not secret stays readable


# ---------------------------------------------------------------- 1-4: secrets

def test_submit_ships_an_allow_list_and_refuses_big_files(monkeypatch, tmp_path, capsys):
    from promptmill.pipelines.ops import submit

    proj = tmp_path / "proj"
    for rel, data in {"jobs/cli.py": "x", "pipelines/spec.py": "x", "pipelines/training/configs/gan.yaml": "x",
                      "models/gan.py": "x", "pyproject.toml": "x", "checkpoints/gan/config.json": "{}",
                      "checkpoints/gan/model.safetensors": "w", "checkpoints/unused/model.safetensors": "w",
                      ".env": "AWS_SECRET_ACCESS_KEY=planted", ".aws/credentials": "planted", "id_rsa": "planted",
                      "secrets/token": "planted", "tests/test_x.py": "x", "benchmarks/b.py": "x",
                      "pipelines/__pycache__/spec.cpython-311.pyc": "x", "data/big.parquet": "x"}.items():
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_text(data)
    monkeypatch.setattr(submit, "PROJECT", proj)
    data = {"name": "t", "input": {"path": "s3://b/in"}, "output": {"path": "s3://b/out"}, "scoring": {"enabled": False},
            "models": [{"name": "gan", "family": "gan", "checkpoint": "checkpoints/gan"}]}
    shipped = [rel for rel, _ in submit.shipped_files(data)]
    assert shipped == ["checkpoints/gan/config.json", "checkpoints/gan/model.safetensors", "promptmill/__init__.py",
                       "promptmill/jobs/cli.py", "promptmill/models/gan.py", "promptmill/pipelines/spec.py",
                       "promptmill/pipelines/training/configs/gan.yaml", "pyproject.toml"]
    staged = Path(submit.stage_working_dir(submit.shipped_files(data)))
    assert sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()) == shipped
    with open(proj / "checkpoints/gan/model.safetensors", "r+b") as f:
        f.truncate(300 * 2**20)  # sparse: 300 MB on paper
    with pytest.raises(SpecError, match=r"checkpoints/gan/model.safetensors is 300 MB, over the 256 MB cap"):
        submit.shipped_files(data)
    data["models"][0]["checkpoint"] = "../elsewhere"
    with pytest.raises(SpecError, match="not a checkpoint directory inside the project"):
        submit.shipped_files(data)
    # --dry-run lists what would travel and submits nothing
    (proj / "checkpoints/gan/model.safetensors").write_text("w")
    data["models"][0]["checkpoint"] = "../checkpoints/gan"  # relative to the spec file, in a folder of the project
    (proj / "specs").mkdir()
    (proj / "specs/spec.yaml").write_text(yaml.safe_dump(data))
    assert main(["submit", str(proj / "specs/spec.yaml"), "--dry-run", "--address", "http://127.0.0.1:9"]) == 0
    out = capsys.readouterr().out
    assert "checkpoints/gan/config.json" in out and "8 files would be shipped" in out and ".env" not in out
    # what travels names it relative to the project: the job's cwd on the cluster is the working_dir
    assert submit.resolved_spec(proj / "specs/spec.yaml")["models"][0]["checkpoint"] == "checkpoints/gan"


def test_submitted_specs_hold_references_not_secrets(monkeypatch, tmp_path, caplog):
    from promptmill.pipelines.ops.submit import job_env, resolved_spec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAPLANTED")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "planted-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    spec = {"name": "t", "input": {"path": "s3://b/in", "storage_options": {"secret": "planted-secret"}},
            "output": {"path": "s3://b/out"}, "models": [{"name": "gan", "family": "gan", "checkpoint": "s3://b/gan"}]}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match=r"input.storage_options.secret hold a secret written out"):
        resolved_spec(str(tmp_path / "spec.yaml"))
    spec["input"]["storage_options"] = {"key": "${AWS_ACCESS_KEY_ID}", "secret": "${AWS_SECRET_ACCESS_KEY}"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    data = resolved_spec(str(tmp_path / "spec.yaml"))
    assert data["input"]["storage_options"]["secret"] == "${AWS_SECRET_ACCESS_KEY}"  # resolved on the cluster
    env = job_env(data)
    assert "planted" not in json.dumps(env) and "AKIAPLANTED" not in json.dumps(env)
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1"
    with caplog.at_level("WARNING"):
        env = job_env(data, pass_aws_credentials=True)
    assert env["AWS_SECRET_ACCESS_KEY"] == "planted-secret" and "readable by anyone" in caplog.text
    # on the cluster, the reference resolves from the job's environment; a missing variable names the field
    assert load_spec(data).input.storage_options["secret"] == "planted-secret"
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(SpecError, match=r"input.storage_options.secret: \$\{AWS_SECRET_ACCESS_KEY\} is not set"):
        load_spec(data)


def test_planted_secrets_appear_in_no_output_byte_or_log_line(ray_local, checkpoints, s3, tmp_path, capfd, caplog):
    """Credentials and a userinfo URL planted in every field that takes them; every object the job writes to S3
    and every log line is searched for them: the driver's (caplog, stdout/stderr) and every file in the Ray
    session's log folder, where actors and workers write (ray_local does not forward them to the driver)."""
    import ray
    import s3fs

    planted = {"key": "AKIAPLANTEDKEY000001", "secret": "planted-secret-0123456789"}
    opts = {"endpoint_url": s3["endpoint_url"], **planted}  # moto accepts any credentials: these are the real ones
    fs = s3fs.S3FileSystem(**s3)
    with fs.open("bucket/sec/in/a.parquet", "wb") as f:
        pq.write_table(pa.table({"id": ["a", "b"], "prompt": ["a red circle", "a blue square"]}), f)
    fs.put(checkpoints["gan"] + "/", "bucket/sec/ckpt/gan/", recursive=True)
    spec = make_spec("s3://bucket/sec/in", "s3://bucket/sec/out", checkpoints,
                     output={"path": "s3://bucket/sec/out", "storage_options": opts, "format": "webdataset"})
    spec["input"]["storage_options"] = opts
    spec["models"][0].update(checkpoint="s3://bucket/sec/ckpt/gan", storage_options=opts)
    spec["scoring"] = {"storage_options": opts}
    with caplog.at_level("INFO"):  # the CLI's level (botocore's own DEBUG lines carry the key id in its signature)
        run_job(load_spec(spec))
    fs.invalidate_cache()
    written = fs.find("bucket/sec/out")
    assert any(p.endswith("summary.json") for p in written) and any(p.endswith(".tar") for p in written)
    blobs = b"".join(fs.cat_file(p) for p in written)
    logs = caplog.text + "".join(capfd.readouterr())
    ray_logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    worker_files = [p for p in ray_logs.rglob("*") if p.is_file()]
    assert any(p.name.startswith("worker-") for p in worker_files)  # the actors' and workers' own logs are there
    worker_logs = b"".join(p.read_bytes() for p in worker_files)
    for secret in planted.values():
        assert secret.encode() not in blobs, secret
        assert secret not in logs, secret
        assert secret.encode() not in worker_logs, secret
    # a checkpoint URL with credentials in it is recorded redacted wherever it is written
    from promptmill.pipelines.batch.preflight import fingerprint

    spec["models"][0]["checkpoint"] = "s3://user:planted-pass@bucket/sec/ckpt/gan"
    assert "planted-pass" not in json.dumps(fingerprint(load_spec(spec)))


# ---------------------------------------------------------------- 5-8: other people's data, one writer

@pytest.mark.parametrize("path", ["", "/", ".", "~", "s3://bucket"])
def test_empty_and_root_like_outputs_are_refused(checkpoints, tmp_path, path):
    from promptmill.pipelines.batch.preflight import PreflightError, check_output
    from promptmill.pipelines.batch.read import plan_input

    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle"], ["a"])
    spec = load_spec(make_spec(str(tmp_path / "in"), path or "x", checkpoints))
    spec.output.path = path
    with pytest.raises(PreflightError, match="empty or a root"):
        check_output(spec, plan_input(spec.input))


def test_foreign_outputs_and_overlaps_with_the_input_are_refused(ray_local, checkpoints, tmp_path):
    from promptmill.pipelines.batch.preflight import PreflightError

    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle"], ["a"])
    (tmp_path / "theirs" / "shards").mkdir(parents=True)
    (tmp_path / "theirs" / "shards" / "00000.tar").write_bytes(b"their data")
    with pytest.raises(PreflightError, match="not a promptmill run"):
        run_job(load_spec(make_spec(str(tmp_path / "in"), str(tmp_path / "theirs"), checkpoints)))
    assert (tmp_path / "theirs" / "shards" / "00000.tar").read_bytes() == b"their data"
    with pytest.raises(PreflightError, match="inside input.path"):
        run_job(load_spec(make_spec(str(tmp_path / "in"), str(tmp_path / "in" / "out"), checkpoints)))
    write_prompts(tmp_path / "out2" / "prompts" / "a.parquet", ["a red circle"], ["a"])
    with pytest.raises(PreflightError, match="is inside output.path"):
        run_job(load_spec(make_spec(str(tmp_path / "out2" / "prompts"), str(tmp_path / "out2"), checkpoints)))
    assert not (tmp_path / "in" / "out").exists()


def test_a_run_deletes_only_what_it_wrote(ray_local, checkpoints, tmp_path):
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", ""], ["a", "b"])
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints)
    run_job(load_spec(spec))
    out = tmp_path / "out"
    (out / "shards").mkdir()
    (out / "shards" / "00000.tar").write_bytes(b"a user's file")  # dropped into our output later
    (out / "rejected" / "notes.parquet").write_bytes(b"a user's file")
    spec["models"][0]["images_per_prompt"] = 3  # more work: a real commit, rejected rows published again
    run_job(load_spec(spec))
    assert (out / "shards" / "00000.tar").read_bytes() == b"a user's file"
    assert (out / "rejected" / "notes.parquet").read_bytes() == b"a user's file"
    assert sorted(p.name for p in (out / "rejected").iterdir()) == ["notes.parquet", "part-00000.parquet"]


def test_dropping_a_model_or_changing_scoring_is_refused_unless_allowed(ray_local, checkpoints, tmp_path, caplog,
                                                                         monkeypatch):
    from promptmill.pipelines.batch.preflight import PreflightError

    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle"], ["a"])
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints)
    spec["models"].append({"name": "dalle", "family": "transformer", "checkpoint": checkpoints["transformer"],
                           "resources": {"batch_size": 4}})
    run_job(load_spec(spec))
    one = {**spec, "models": spec["models"][:1]}
    with pytest.raises(PreflightError, match=r"holds images of models \['dalle'\] that this spec leaves out"):
        run_job(load_spec(one))
    with pytest.raises(PreflightError, match="already holds a run with scoring"):
        run_job(load_spec({**spec, "scoring": {"enabled": False}}))
    write_prompts(tmp_path / "in" / "b.parquet", ["a blue square"], ["b"])  # the kept model has work again
    monkeypatch.setenv("PROMPTMILL_PROGRESS_S", "0")
    with caplog.at_level("INFO", logger="promptmill.pipelines.batch.progress"):
        assert run_job(load_spec(one), allow_subset=True).images_total == {"gan": 4, "dalle": 1}
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress: ")]
    assert lines[-1].startswith("progress: 2 / 2 images (100 %)"), lines  # the left-out model's image not counted
    recorded = json.loads((tmp_path / "out" / "_spec.json").read_text())
    assert set(recorded["models"]) == {"gan", "dalle"}  # the dropped model's settings stay guarded


def test_stale_leases_are_taken_over_and_live_ones_name_their_owner(tmp_path):
    import socket
    import time

    from promptmill.pipelines.batch.lease import Lease, LeaseHeld
    from promptmill.pipelines.storage import filesystem

    fs, root = filesystem(str(tmp_path / "out"))
    lease_file = tmp_path / "out" / "_lease.json"
    lease_file.parent.mkdir()

    def plant(host: str, pid: int, expires: float) -> None:
        lease_file.write_text(json.dumps({"run": "other", "host": host, "pid": pid, "job": "j1", "expires": expires,
                                          "pidns": os.readlink("/proc/self/ns/pid")}))

    plant("elsewhere", 123, time.time() + 600)
    with pytest.raises(LeaseHeld, match=r"held by run other \(pid 123 on elsewhere, job j1; its lease expires in"):
        Lease(fs, root).acquire()
    plant(socket.gethostname(), 2**22 + 12345, time.time() + 600)  # this host, no such process: stale at once
    with Lease(fs, root).acquire() as lease:
        assert json.loads(lease_file.read_text())["run"] == lease.me.run
    assert not lease_file.exists()  # released
    plant("elsewhere", 123, time.time() - 1)  # expired
    Lease(fs, root).acquire().release()


@pytest.mark.parametrize("fmt,store", [pytest.param("files", "local", marks=pytest.mark.slow),
                                       pytest.param("parquet", "local", marks=pytest.mark.slow),
                                       ("webdataset", "s3")])  # each format, both stores (every case costs a second
# process and an embedded Ray: 33-44 s); the two local ones run in make chaos
def test_a_second_writer_is_refused_while_the_first_commits_and_a_crash_keeps_the_settings(
        ray_local, checkpoints, s3, tmp_path, fmt, store):
    """Two real processes: A is held at its commit step (the fault seam) with its images staged; B, same output,
    is refused naming A; A is killed there; B with another seed is refused (the settings were on record before
    A's first image); B with A's spec takes the dead run's lease over and ends exactly once."""
    import time

    import s3fs
    from conftest import kill_session
    from promptmill.pipelines.batch.preflight import PreflightError
    from promptmill.pipelines.runs.results import Run

    prompts = [f"a red circle number {i}" for i in range(6)]
    if store == "s3":
        fs = s3fs.S3FileSystem(**s3)
        with fs.open(f"bucket/lease-{fmt}/in/a.parquet", "wb") as f:
            pq.write_table(pa.table({"id": [f"p{i}" for i in range(6)], "prompt": prompts}), f)
        inp, out = f"s3://bucket/lease-{fmt}/in", f"s3://bucket/lease-{fmt}/out"
        opts = dict(s3)
    else:
        write_prompts(tmp_path / "in" / "a.parquet", prompts, [f"p{i}" for i in range(6)])
        inp, out, opts = str(tmp_path / "in"), str(tmp_path / "out"), {}
    spec = make_spec(inp, out, checkpoints, output={"path": out, "format": fmt, "storage_options": opts})
    spec["input"]["storage_options"] = opts
    spec["scoring"] = {"enabled": False}
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(spec))
    env = {**os.environ, "PROMPTMILL_PAUSE_AT": "commit:120"}
    env.pop("RAY_ADDRESS", None)
    a = subprocess.Popen([sys.executable, "-m", "promptmill.jobs.cli", "generate", str(tmp_path / "a.yaml")], env=env,
                         start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    from promptmill.pipelines.storage import filesystem

    ofs, root = filesystem(out, opts)
    try:
        t0 = time.time()
        while not (ofs.exists(f"{root}/_staging/metadata") and ofs.find(f"{root}/_staging/metadata")):
            assert a.poll() is None and time.time() - t0 < 120, a.stdout.read() if a.poll() is not None else "slow"
            time.sleep(0.5)
            ofs.invalidate_cache()
        time.sleep(1)
        with pytest.raises(PreflightError, match=rf"held by run \w+ \(pid {a.pid} on "):
            run_job(load_spec(spec))
    finally:
        kill_session(a.pid)
    ofs.invalidate_cache()
    assert not ofs.exists(f"{root}/_SUCCESS")
    with pytest.raises(PreflightError, match="already holds a run with seed 0"):
        run_job(load_spec({**spec, "seed": 1}))
    res = run_job(load_spec(spec))
    assert res.images_total == {"gan": 12}
    rows = Run(out, opts).rows("gan")
    keys = list(zip(rows.column("id").to_pylist(), rows.column("sample").to_pylist()))
    assert len(keys) == len(set(keys)) == 12
    assert [im.shape for im in Run(out, opts).images(rows)] == [(32, 32, 3)] * 12


def test_deploy_files_keep_the_dashboard_private_with_token_auth_and_no_static_keys():
    root = Path(__file__).resolve().parents[1]
    cluster = yaml.safe_load((root / "cluster.yaml").read_text())
    starts = cluster["head_start_ray_commands"] + cluster["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if c.startswith("RAY_AUTH_MODE") or "ray start" in c)
    assert not any("0.0.0.0" in c for c in starts) and "~/.ray/auth_token" in cluster["file_mounts"]
    for name in ("rayjob-generate.yaml", "raycronjob-schedule.yaml"):
        text = (root / "deploy" / "kuberay" / name).read_text()
        assert "AWS_SECRET_ACCESS_KEY" not in text and "promptmill-s3" not in text and "serviceAccountName" in text
    rayjob = list(yaml.safe_load_all((root / "deploy" / "kuberay" / "rayjob-generate.yaml").read_text()))[1]
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}


# ---------------------------------------------------------------- 9, 14: checkpoints and runaway restarts

def test_a_checkpoint_config_cannot_make_the_loader_allocate(checkpoints, tmp_path):
    """config.json is checked against the safetensors header (names, shapes) on the meta device before any
    weight is read: an edited n_embd cost 505 MiB before, a bigger one would kill the driver."""
    import shutil

    import psutil
    from promptmill.models import CheckpointError, load_generator
    from promptmill.models.judge import load_judge

    edited = tmp_path / "edited"
    shutil.copytree(checkpoints["transformer"], edited)
    cfg = json.loads((edited / "config.json").read_text())
    cfg["config"]["n_embd"] = 4096  # ~6 GB of fp32 weights if built for real
    (edited / "config.json").write_text(json.dumps(cfg))
    rss = psutil.Process().memory_info().rss
    with pytest.raises(CheckpointError, match=r"weights do not match config.json \(.*config wants"):
        load_generator(str(edited), "cpu")
    assert psutil.Process().memory_info().rss - rss < 200 * 2**20
    cfg["config"]["n_layer"] = 10**6
    (edited / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config.n_layer = 1000000 is out of range"):
        load_generator(str(edited), "cpu")
    with pytest.raises(CheckpointError, match="is a 'transformer' checkpoint, not a 'judge' one"):
        load_judge(checkpoints["transformer"])
    judge = tmp_path / "judge"
    shutil.copytree(Path(__file__).resolve().parents[1] / "models" / "checkpoints" / "judge", judge)
    cfg = json.loads((judge / "config.json").read_text())
    cfg["config"]["width"] *= 2
    (judge / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="weights do not match"):
        load_judge(str(judge))


def test_a_bad_scorer_checkpoint_is_a_preflight_error(checkpoints, tmp_path, capsys):
    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle"], ["a"])
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints,
                     scoring={"clip": checkpoints["gan"], "judge": None})
    assert _cli(spec, tmp_path) == 2
    assert "scoring.clip" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_an_actor_that_keeps_dying_fails_the_job_instead_of_hanging(ray_local, checkpoints, tmp_path):
    """Ray restarts pool actors without limit by default: a batch that kills its actor every time (OOM) hung the
    job. Restarts are bounded; past them the job fails with one line and the rerun resumes."""
    import threading
    import time

    import psutil
    from promptmill.pipelines.batch.job import JobFailed
    from promptmill.pipelines.batch.pools import MAX_ACTOR_RESTARTS

    write_prompts(tmp_path / "in" / "a.parquet", [f"a red circle {i}" for i in range(64)], [f"p{i}" for i in range(64)])
    spec = make_spec(str(tmp_path / "in"), str(tmp_path / "out"), checkpoints, scoring={"enabled": False})
    stop, kills = threading.Event(), []

    def killer() -> None:  # plays the OOM killer: every generator actor dies as soon as it is up
        while not stop.is_set():
            for p in psutil.process_iter(["cmdline"]):
                if "GenerateStage" in " ".join(p.info["cmdline"] or []) and p.pid not in kills:
                    kills.append(p.pid)
                    p.kill()
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    t0 = time.time()
    try:
        with pytest.raises(JobFailed, match="generate"):
            run_job(load_spec(spec))
    finally:
        stop.set()
        t.join()
    assert len(kills) >= MAX_ACTOR_RESTARTS + 1
    assert time.time() - t0 < 600, "the job neither finished nor failed"  # a hang guard, no speed claim
    assert run_job(load_spec(spec)).images_total == {"gan": 128}  # nothing lost: the rerun finishes it
