"""Hostile storage and shared outputs (moto S3): a key in a model prefix never writes outside the local copy,
and a run deletes only names of its own layout, whatever a file in the output folder lists."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import make_spec
from promptmill.models.errors import CheckpointError
from promptmill.models.local_cache import local_copy
from promptmill.pipelines.batch.job import run_job
from promptmill.pipelines.spec import load_spec


def _client(s3):
    return boto3.client("s3", endpoint_url=s3["endpoint_url"], aws_access_key_id=s3["key"],
                        aws_secret_access_key=s3["secret"], region_name="us-east-1")


@pytest.mark.parametrize("key", ["m/../../../escape.pth", "m/sub/../../../../escape.pth", "m/./config.json",
                                 "m//escape.pth", "m/a\\..\\..\\escape.pth"])
def test_a_model_prefix_with_an_unsafe_key_is_refused_whole_naming_the_key(s3, tmp_path, monkeypatch, key):
    """S3 keys are literal: `..` in one is not a folder above. The copy is refused before any file is written."""
    monkeypatch.setenv("PROMPTMILL_CACHE", str(tmp_path / "cache"))
    c = _client(s3)
    bucket = f"hostile-{abs(hash(key)) % 10**8}"
    c.create_bucket(Bucket=bucket)
    c.put_object(Bucket=bucket, Key="m/config.json", Body=b"{}")
    c.put_object(Bucket=bucket, Key=key, Body=b"import os  # runs at interpreter start from a .pth")
    assert key in [o["Key"] for o in c.list_objects_v2(Bucket=bucket)["Contents"]]  # stored literally
    with pytest.raises(CheckpointError, match="unsafe key") as err:
        local_copy(f"s3://{bucket}/m", s3)
    assert repr(key.removeprefix("m"))[1:-1] in str(err.value) or key.removeprefix("m") in str(err.value)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written == [], written  # nothing copied, inside the cache or out of it


def test_a_model_prefix_of_ordinary_keys_is_copied_with_its_folders(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTMILL_CACHE", str(tmp_path / "cache"))
    c = _client(s3)
    c.create_bucket(Bucket="fine")
    for k in ("m/model_index.json", "m/unet/config.json", "m/unet/diffusion..model.safetensors", "m/.hidden"):
        c.put_object(Bucket="fine", Key=k, Body=k.encode())
    for marker in ("m/", "m/unet/"):  # what the S3 console's "Create folder" leaves: not keys of the model
        c.put_object(Bucket="fine", Key=marker, Body=b"")
    copy = tmp_path / "cache"
    got = local_copy("s3://fine/m", s3)
    assert (copy / "models").resolve() in [p.resolve() for p in Path(got).parents]
    assert Path(got, "unet", "diffusion..model.safetensors").read_bytes() == b"m/unet/diffusion..model.safetensors"
    assert Path(got, ".hidden").exists() and Path(got, "model_index.json").exists()


def _job(s3, out: str, checkpoints, fmt: str = "webdataset") -> dict:
    spec = make_spec("s3://bucket/prompts/", out, checkpoints)
    spec["input"]["storage_options"] = s3
    spec["output"].update(storage_options=s3, format=fmt)
    spec["scoring"] = {"enabled": False}
    return spec


def _prompts(fs, name: str, ids: list[str], prompts: list[str]) -> None:
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ids, "prompt": prompts}), buf)
    fs.pipe(f"bucket/prompts/{name}.parquet", buf.getvalue())


def test_commit_and_finalize_delete_only_names_of_our_own_layout(ray_local, checkpoints, s3, caplog):
    """A shared output's `_staging/shards-manifest-*.json` and `summary.json` are writable by others: what they
    list is deleted only when it is one of our shards or rejected parts under this output."""
    fs = s3fs.S3FileSystem(**s3)
    _prompts(fs, "a", ["a", "b"], ["a red circle", ""])
    spec = _job(s3, "s3://bucket/shared/out", checkpoints)
    run_job(load_spec(spec))
    fs.invalidate_cache()
    assert fs.exists("bucket/shared/out/shards/gan/00000.tar")
    victims = {"bucket/elsewhere/victim.parquet": b"another team's table",
               "bucket/shared/out/images/not-a-shard.png": b"x",
               "bucket/shared/other-run/shards/gan/00000.tar": b"another run's shard",
               "bucket/shared/out/notes.txt": b"a user's notes"}
    for path, data in victims.items():
        fs.pipe(path, data)
    orphan = "bucket/shared/out/shards/gan/00007.tar"  # ours by name, referenced by no row: swept as before
    fs.pipe(orphan, b"left by a commit that died")
    fs.pipe("bucket/shared/out/_staging/shards-manifest-planted.json", json.dumps(
        ["bucket/elsewhere/victim.parquet", "bucket/shared/out/shards/gan/../../images/not-a-shard.png",
         "bucket/shared/out/shards/../other-run/shards/gan/00000.tar", "bucket/shared/other-run/shards/gan/00000.tar",
         "s3://bucket/elsewhere/victim.parquet", orphan]).encode())
    summary = json.loads(fs.cat_file("bucket/shared/out/summary.json"))
    summary["rejected_files"] = ["../../elsewhere/victim.parquet", "../notes.txt", "/bucket/shared/out/notes.txt",
                                 *summary["rejected_files"]]
    fs.pipe("bucket/shared/out/summary.json", json.dumps(summary).encode())
    _prompts(fs, "b", ["c"], ["a blue square"])  # new work: a real commit and a new rejected table
    with caplog.at_level(logging.WARNING):
        res = run_job(load_spec(spec))
    assert res.images_total == {"gan": 4}
    fs.invalidate_cache()
    for path, data in victims.items():
        assert fs.cat_file(path) == data, path
    assert not fs.exists(orphan)
    assert fs.find("bucket/shared/out/rejected") == ["bucket/shared/out/rejected/part-00000.parquet"]
    left = " ".join(r.getMessage() for r in caplog.records)
    assert "bucket/elsewhere/victim.parquet" in left and "../notes.txt" in left  # named, and left alone


@pytest.mark.slow  # 70 s: make chaos; credentials in storage options stay masked in test_security.py by default
def test_models_named_like_secrets_run_and_resume_while_credentials_stay_masked(ray_local, checkpoints, s3):
    """Redaction masks credentials (text under secret-looking keys), never data keyed by a model's name."""
    fs = s3fs.S3FileSystem(**s3)
    _prompts(fs, "names", ["a"], ["a red circle"])
    spec = _job(s3, "s3://bucket/names/out", checkpoints, fmt="files")
    spec["input"]["path"] = "s3://bucket/prompts/names.parquet"
    spec["models"] = [{**spec["models"][0], "name": n} for n in ("monkey", "tokenizer-v2", "session1")]
    res = run_job(load_spec(spec))
    assert res.images_total == {"monkey": 2, "tokenizer-v2": 2, "session1": 2}
    record = json.loads(fs.cat_file("bucket/names/out/_spec.json"))
    assert record["models"]["monkey"]["family"] == "gan"
    summary = json.loads(fs.cat_file("bucket/names/out/summary.json"))
    assert summary["images_total"]["monkey"] == 2 and summary["scores"]["tokenizer-v2"]["images"] == 2
    assert summary["spec"]["output"]["storage_options"]["secret"] == "***"  # the credential still masked
    assert s3["secret"] not in fs.cat_file("bucket/names/out/summary.json").decode()
    _prompts(fs, "names", ["a", "b"], ["a red circle", "a blue square"])
    assert run_job(load_spec(spec)).images_written == {"monkey": 2, "tokenizer-v2": 2, "session1": 2}  # resumed


def test_control_characters_are_rejected_and_long_prompts_fit_a_jpegs_xmp(ray_local, checkpoints, s3):
    from PIL import Image

    fs = s3fs.S3FileSystem(**s3)
    long_prompt = "a small red circle on the left " * 2500  # 77,500 characters: over a JPEG's 64 KB XMP segment
    _prompts(fs, "odd", ["bell", "esc", "c1", "tab", "long"],
             ["a red\x07 circle", "a \x1b[31mred circle", "a red\x85circle", "a red\tcircle\non two lines", long_prompt])
    spec = _job(s3, "s3://bucket/odd/out", checkpoints, fmt="files")
    spec["input"].update(path="s3://bucket/prompts/odd.parquet", max_prompt_chars=100_000)
    spec["output"]["image_format"] = "jpeg"
    spec["models"][0]["images_per_prompt"] = 1
    res = run_job(load_spec(spec))
    assert res.rejected == {"control_characters": 3} and res.images_total == {"gan": 2}
    rejected = pq.read_table(io.BytesIO(fs.cat_file(fs.find("bucket/odd/out/rejected")[0]))).to_pylist()
    assert sorted(r["id"] for r in rejected) == ["bell", "c1", "esc"]
    rows = {r["id"]: r for r in pq.read_table(io.BytesIO(fs.cat_file(fs.find("bucket/odd/out/metadata")[0]))).to_pylist()}
    assert rows["long"]["prompt"] == long_prompt  # the metadata keeps the whole prompt
    im = Image.open(io.BytesIO(fs.cat_file(f"bucket/odd/out/{rows['long']['image_path']}")))  # relative to the output
    xmp = im.info["xmp"].decode()
    import hashlib
    import xml.dom.minidom

    xml.dom.minidom.parseString(xmp.split("?>", 1)[1].rsplit("<?xpacket", 1)[0])  # well-formed
    assert hashlib.sha256(long_prompt.encode()).hexdigest() in xmp and len(xmp) < 64_000
    from promptmill.pipelines.provenance import MAX_FIELD_CHARS

    assert long_prompt[:MAX_FIELD_CHARS] in xmp
    assert "a red\tcircle" in Image.open(io.BytesIO(fs.cat_file(f"bucket/odd/out/{rows['tab']['image_path']}"))
                               ).info["xmp"].decode()


@pytest.mark.parametrize("index", ["[1, 2]", '{"_class_name": ["StableDiffusionPipeline"]}', '{"_class_name": "os.system"}'])
def test_a_malformed_model_index_is_a_clear_error(tmp_path, index):
    pytest.importorskip("diffusers")
    from promptmill.models.hf_diffusers import pipeline_class

    (tmp_path / "model_index.json").write_text(index)
    with pytest.raises(CheckpointError, match="model_index.json is not valid"):
        pipeline_class(str(tmp_path))


def test_pickled_weights_are_refused_with_how_to_convert(s3, tmp_path, monkeypatch):
    """A diffusers pipeline or a Hugging Face CLIP whose weights are only .bin pickles is never unpickled."""
    pytest.importorskip("diffusers")
    import torch
    from promptmill.models.hf_clip import load_hf_clip
    from promptmill.models.hf_diffusers import DiffusersGenerator
    from tiny_hf import tiny_hf_clip, tiny_sd

    monkeypatch.setenv("PROMPTMILL_CACHE", str(tmp_path / "cache"))
    fs = s3fs.S3FileSystem(**s3)
    sd = tiny_sd(tmp_path / "sd")
    unet = sd / "unet"
    weights = next(unet.glob("*.safetensors"))
    torch.save({"planted": torch.zeros(1)}, unet / "diffusion_pytorch_model.bin")  # what a .bin-only export holds
    weights.unlink()
    fs.put(str(sd) + "/", "bucket/pickled/sd/", recursive=True)
    with pytest.raises(CheckpointError, match=r"unet/diffusion_pytorch_model.bin hold pickled weights.*safe_serialization"):
        DiffusersGenerator.load("s3://bucket/pickled/sd", torch.device("cpu"), s3)
    clip = tiny_hf_clip(tmp_path / "clip")
    for f in clip.glob("*.safetensors"):
        torch.save({"planted": torch.zeros(1)}, clip / "pytorch_model.bin")
        f.unlink()
    with pytest.raises(CheckpointError, match="pytorch_model.bin hold pickled weights"):
        load_hf_clip(str(clip))


def test_submit_never_follows_a_link_out_of_the_project(tmp_path, monkeypatch, capsys):
    import yaml
    from promptmill.jobs.cli import main
    from promptmill.pipelines.ops import submit

    proj, home = tmp_path / "proj", tmp_path / "home"
    for rel in ("jobs/cli.py", "pipelines/spec.py", "models/gan.py", "pyproject.toml", "checkpoints/gan/config.json",
                "checkpoints/gan/model.safetensors", "specs/notes.md"):
        (proj / rel).parent.mkdir(parents=True, exist_ok=True)
        (proj / rel).write_text("x")
    (home / ".aws").mkdir(parents=True)
    (home / ".aws" / "credentials").write_text("aws_secret_access_key = planted")
    monkeypatch.setattr(submit, "PROJECT", proj)
    data = {"name": "t", "input": {"path": "s3://b/in"}, "output": {"path": "s3://b/out"}, "scoring": {"enabled": False},
            "models": [{"name": "gan", "family": "gan", "checkpoint": "../checkpoints/gan"}]}
    (proj / "specs" / "spec.yaml").write_text(yaml.safe_dump(data))
    (proj / "checkpoints" / "gan" / "readme.md").symlink_to(proj / "specs" / "notes.md")  # inside: travels
    args = ["submit", str(proj / "specs" / "spec.yaml"), "--dry-run", "--address", "http://127.0.0.1:9"]
    assert main(args) == 0
    assert "checkpoints/gan/readme.md" in capsys.readouterr().out
    for link, target in (("checkpoints/gan/creds", home / ".aws" / "credentials"), ("models/aws", home / ".aws")):
        (proj / link).symlink_to(target)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{proj / link} is a link to {target}, outside the project" in err and "planted" not in err
        (proj / link).unlink()


def _plant(fs, path: str, **over) -> None:
    import os
    import socket
    import time

    h = {"run": "other", "host": socket.gethostname(), "pid": 2**22 + 12345, "job": "j", "expires": time.time() - 1,
         "generation": 4, "pidns": os.readlink("/proc/self/ns/pid"), **over}
    fs.pipe_file(path, json.dumps(h).encode())


@pytest.mark.parametrize("store", ["local", "s3"])
def test_of_two_contenders_for_a_stale_lease_exactly_one_wins_and_renewal_is_compare_and_swap(s3, tmp_path, store):
    import threading

    from promptmill.pipelines.batch.lease import Lease, LeaseHeld
    from promptmill.pipelines.storage import filesystem

    url = str(tmp_path / "out") if store == "local" else f"s3://bucket/lease-cas-{store}/out"
    fs, root = filesystem(url, s3 if store == "s3" else None)
    fs.makedirs(root, exist_ok=True)
    for _ in range(5):  # a race: several rounds, each from a fresh stale lease
        _plant(fs, f"{root}/_lease.json")
        contenders, won, barrier = [Lease(fs, root, ttl_s=30) for _ in range(2)], [], threading.Barrier(2)

        def take(lease: Lease, barrier=barrier, won=won) -> None:
            h, version = lease._read()
            barrier.wait()  # both read the same stale lease, then both try to swap it
            lease.me.generation = h.generation + 1
            if lease._swap(version, lease._payload()) is not None:
                won.append(lease)

        threads = [threading.Thread(target=take, args=(c,)) for c in contenders]
        [t.start() for t in threads]
        [t.join() for t in threads]
        assert len(won) == 1, won
        assert json.loads(fs.cat_file(f"{root}/_lease.json"))["run"] == won[0].me.run
    # through acquire: the generation is one above the stale lease's, the token says so
    _plant(fs, f"{root}/_lease.json", generation=7)
    a = Lease(fs, root, ttl_s=30).acquire()
    assert a.token == f"8.{a.me.run}"
    # a stalled writer that wakes cannot renew over its successor: its CAS fails and it is lost
    _plant(fs, f"{root}/_lease.json", run="successor", expires=__import__("time").time() + 600)
    with pytest.raises(LeaseHeld, match="lost its lease to run successor"):
        a.check()
    assert a.lost.is_set() and json.loads(fs.cat_file(f"{root}/_lease.json"))["run"] == "successor"
    a.release()  # not ours any more: left in place
    assert json.loads(fs.cat_file(f"{root}/_lease.json"))["run"] == "successor"


def test_a_renewal_error_marks_the_lease_lost(tmp_path):
    import time

    from promptmill.pipelines.batch.lease import Lease, LeaseHeld
    from promptmill.pipelines.storage import filesystem

    fs, root = filesystem(str(tmp_path / "out"))
    lease = Lease(fs, root, ttl_s=3).acquire()
    lease_file = tmp_path / "out" / "_lease.json"
    lease_file.unlink()
    lease_file.mkdir()  # the store answers the renewal's read with an error (not "gone", not "changed")
    t0 = time.time()
    while not lease.lost.is_set() and time.time() - t0 < 30:  # a hang guard, not a timing claim
        time.sleep(0.1)
    assert lease.lost.is_set()
    with pytest.raises(LeaseHeld, match="lost its lease"):
        lease.check()
    lease.release()


def test_another_pid_namespace_on_this_host_is_not_read_as_a_dead_process(tmp_path):
    import time

    from promptmill.pipelines.batch.lease import Lease, LeaseHeld
    from promptmill.pipelines.storage import filesystem

    fs, root = filesystem(str(tmp_path / "out"))
    fs.makedirs(root, exist_ok=True)
    _plant(fs, f"{root}/_lease.json", pidns="pid:[1]", expires=time.time() + 600)  # a container sharing our hostname
    with pytest.raises(LeaseHeld, match="held by run other"):
        Lease(fs, root).acquire()
    _plant(fs, f"{root}/_lease.json", expires=time.time() + 600)  # our namespace, no such process: stale at once
    Lease(fs, root).acquire().release()


def test_a_writer_stalled_past_its_lease_commits_nothing_and_its_successor_ends_exactly_once(
        ray_local, checkpoints, tmp_path, monkeypatch):
    """Two real processes. A is stopped (SIGSTOP) at its commit step with its images staged, past its lease's
    expiry; B takes the lease over, adopts A's staged parts and finishes, while a part A's token stages after the
    takeover is left out. A then wakes: its renewal's CAS fails, it commits nothing, and B's output stays
    exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from conftest import kill_session, write_prompts
    from promptmill.pipelines.layout import staged_part_name
    from promptmill.pipelines.runs.results import Run

    write_prompts(tmp_path / "in" / "a.parquet", [f"a red circle number {i}" for i in range(6)],
                  [f"p{i}" for i in range(6)])
    out, staging = tmp_path / "out", tmp_path / "out" / "_staging" / "metadata"
    spec = make_spec(str(tmp_path / "in"), str(out), checkpoints)
    spec["scoring"] = {"enabled": False}
    spec["output"]["lease_ttl_s"] = 3
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    a = subprocess.Popen([sys.executable, "-m", "promptmill.jobs.cli", "generate", str(tmp_path / "a.yaml")],
                         env={**env, "PROMPTMILL_PAUSE_AT": "commit:6"}, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    class LateStalePart(logging.Handler):
        """When B pauses before its commit (after it took the lease and listed staging), A's token stages a part."""

        def emit(self, record: logging.LogRecord) -> None:
            if "pausing before commit" in record.getMessage():
                t = pq.read_table(staging / staged_by_a[0]).slice(0, 1)
                pq.write_table(t.set_column(t.schema.get_field_index("id"), "id", pa.array(["stale"])),
                               staging / staged_part_name(staged_by_a[0].split("~")[0]))

    handler = LateStalePart()
    try:
        t0 = time.time()
        while not staging.exists() or not any(staging.iterdir()):
            assert a.poll() is None and time.time() - t0 < 180, "A ended or hung before staging"  # hang guard
            time.sleep(0.2)
        time.sleep(1.5)  # A reaches its pause
        os.kill(a.pid, signal.SIGSTOP)
        time.sleep(4)  # past A's 3 s lease
        staged_by_a = sorted(p.name for p in staging.iterdir())
        monkeypatch.setenv("PROMPTMILL_PAUSE_AT", "commit:0.1")
        logging.getLogger("promptmill.pipelines.batch.finalize").addHandler(handler)
        res = run_job(load_spec(spec))
        assert res.images_total == {"gan": 12} and res.images_written == {"gan": 0}  # A's staged work adopted
        assert (out / "_SUCCESS").exists()
        committed = sorted(p.name for p in (out / "metadata").iterdir())
        os.kill(a.pid, signal.SIGCONT)
        a_out, _ = a.communicate(timeout=120)
    finally:
        logging.getLogger("promptmill.pipelines.batch.finalize").removeHandler(handler)
        kill_session(a.pid)
    assert a.returncode != 0 and "lost its lease" in a_out, a_out[-3000:]
    assert sorted(p.name for p in (out / "metadata").iterdir()) == committed  # A replaced nothing
    rows = Run(str(out)).rows("gan")
    keys = list(zip(rows.column("id").to_pylist(), rows.column("sample").to_pylist()))
    assert len(keys) == len(set(keys)) == 12 and (out / "_SUCCESS").exists()
    assert "stale" not in rows.column("id").to_pylist()


def _bomb_png(width: int, height: int) -> bytes:
    """A 1 x 1 PNG whose header claims `width` x `height`: decoding it would inflate to gigabytes."""
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


def test_report_and_evaluate_read_only_the_runs_own_bounded_images(ray_local, checkpoints, tmp_path, capsys):
    import shutil
    import subprocess

    from conftest import write_prompts
    from promptmill.jobs.cli import main
    from promptmill.pipelines.runs.results import Run

    write_prompts(tmp_path / "in" / "a.parquet", ["a red circle", "a blue square"], ["a", "b"])
    runs = {}
    for fmt in ("files", "webdataset"):
        spec = make_spec(str(tmp_path / "in"), str(tmp_path / fmt), checkpoints)
        spec["scoring"] = {"enabled": False}
        spec["output"]["format"] = fmt
        run_job(load_spec(spec))
        runs[fmt] = tmp_path / fmt
    # files: an image_path pointing out of the run (another folder, a device) is refused, naming it
    meta = next((runs["files"] / "metadata").iterdir())
    table = pq.read_table(meta)
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(runs["files"] / table.column("image_path")[0].as_py(), tmp_path / "elsewhere" / "x.png")
    for bad in (str(tmp_path / "elsewhere" / "x.png"), "/dev/zero", f"{runs['files']}/images/../../elsewhere/x.png",
                "s3://another-bucket/x.png", "../elsewhere/x.png", "images/../../elsewhere/x.png"):  # relative too
        paths = table.column("image_path").to_pylist()
        paths[0] = bad
        pq.write_table(table.set_column(table.schema.get_field_index("image_path"), "image_path", pa.array(paths)),
                       meta)
        with pytest.raises(ValueError, match="is outside the run"):
            Run(str(runs["files"])).images(Run(str(runs["files"])).rows("gan"))
        assert main(["report", str(runs["files"])]) == 1
        assert "is outside the run" in capsys.readouterr().err
    pq.write_table(table, meta)
    # a link planted in the run's own folder, to a device: refused before it is opened
    first = runs["files"] / table.column("image_path")[0].as_py()
    saved = first.read_bytes()
    first.unlink()
    first.symlink_to("/dev/zero")
    with pytest.raises(ValueError, match="is a link out of the run"):
        Run(str(runs["files"])).images(Run(str(runs["files"])).rows("gan"))
    first.unlink()
    first.write_bytes(saved)
    # a decompression bomb in the run's own folder: the header is read, the pixels never decoded
    first.write_bytes(_bomb_png(50_000, 50_000))
    with pytest.raises(ValueError, match="over the 67,108,864-pixel bound"):
        Run(str(runs["files"])).images(Run(str(runs["files"])).rows("gan"))
    # webdataset: a shard replaced by a tar with a sparse member (10 KB claiming 300 MB) is refused
    shard = next((runs["webdataset"] / "shards" / "gan").iterdir())
    sparse = tmp_path / "sparse"
    sparse.mkdir()
    with open(sparse / "a_0.png", "wb") as f:
        f.truncate(300 * 2**20)
    subprocess.run(["tar", "--sparse", "--format=gnu", "-cf", str(shard), "-C", str(sparse), "a_0.png"], check=True)
    assert shard.stat().st_size < 100_000
    with pytest.raises(ValueError, match="is not a plain file"):
        Run(str(runs["webdataset"])).images(Run(str(runs["webdataset"])).rows("gan"))


def test_env_references_resolve_only_in_storage_fields_and_credentials_are_never_written(
        ray_local, checkpoints, s3, tmp_path, monkeypatch, caplog):
    from promptmill.pipelines.spec import SpecError

    fs = s3fs.S3FileSystem(**s3)
    fs.mkdir("pm-env-bucket")
    monkeypatch.setenv("PM_BUCKET", "pm-env-bucket")
    monkeypatch.setenv("PM_SECRET", "a-secret-value-0815")
    _prompts(fs, "env", ["a"], ["a red circle"])
    spec = _job(s3, "s3://${PM_BUCKET}/run", checkpoints, fmt="files")
    spec["input"]["path"] = "s3://bucket/prompts/env.parquet"
    spec["output"]["storage_options"] = {**s3, "secret": "${PM_SECRET}", "client_kwargs": {"region_name": "${PM_SECRET}"}}
    spec["output"]["report"] = True
    spec["input"]["blocklist"] = {"words": ["${price}"]}  # not a storage field: kept as written, unset or not
    loaded = load_spec(spec)
    assert loaded.input.blocklist.words == ["${price}"] and loaded.output.path == "s3://pm-env-bucket/run"
    assert loaded.output.storage_options["client_kwargs"]["region_name"] == "a-secret-value-0815"
    with caplog.at_level(logging.DEBUG, logger="promptmill"):  # ours (botocore's DEBUG lines name the region)
        run_job(loaded)
    fs.invalidate_cache()
    written = [fs.cat_file(f) for f in fs.find("pm-env-bucket/run")]
    assert len(written) > 5 and not any(b"a-secret-value-0815" in w for w in written)
    assert b"region_name" in fs.cat_file("pm-env-bucket/run/summary.json")  # the field is there, its value masked
    leaked = [f"{r.name}: {r.getMessage()[:300]}" for r in caplog.records
              if r.name.startswith("promptmill") and "a-secret-value-0815" in r.getMessage()]
    assert not leaked, leaked
    with pytest.raises(SpecError, match=r"output.path: \$\{PM_UNSET\} is not set"):
        load_spec({**spec, "output": {**spec["output"], "path": "s3://${PM_UNSET}/run"}})


def test_a_schedule_resolves_its_own_storage_references_at_fire_time_and_submits_them_unresolved(
        ray_local, checkpoints, s3, tmp_path, monkeypatch, capsys):
    import datetime as dt

    import yaml
    from promptmill.jobs.cli import main
    from promptmill.pipelines.ops.schedule import job_data, load_schedule

    fs = s3fs.S3FileSystem(**s3)
    buf = io.BytesIO()
    pq.write_table(pa.table({"sku": ["s1"], "color": ["red"]}), buf)
    fs.pipe("bucket/sched/catalog.parquet", buf.getvalue())
    monkeypatch.setenv("PM_S3_ENDPOINT", s3["endpoint_url"])
    opts = {"endpoint_url": "${PM_S3_ENDPOINT}", "key": "testing", "secret": "testing"}
    data = {"name": "ads", "cron": "0 * * * *", "start": "2026-11-24T06:00:00Z",
            "catalog": {"path": "s3://bucket/sched/catalog.parquet", "storage_options": opts},
            "templates": ["a {color} circle"],
            "models": [{"name": "gan", "family": "gan", "checkpoint": checkpoints["gan"],
                        "resources": {"batch_size": 8}}],
            "scoring": {"enabled": False}, "output": {"prefix": "s3://bucket/sched/runs", "storage_options": opts}}
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["schedule", str(path), "--once", "--at", "2026-11-24T08:30:00Z"]) == 0
    import json as json_

    assert json_.loads(capsys.readouterr().out.strip().splitlines()[-1])["status"] == "complete"
    assert fs.exists("bucket/sched/runs/ads-20261124T080000Z/_SUCCESS")
    s = load_schedule(str(path))
    submitted = job_data(s, dt.datetime(2026, 11, 24, 9, tzinfo=dt.UTC))
    assert submitted["output"]["storage_options"]["endpoint_url"] == "${PM_S3_ENDPOINT}"  # resolves on the cluster


def test_a_lease_in_a_missing_bucket_is_an_error_not_a_wait_on_itself(s3):
    """Creating the lease where there is no bucket is not "the lease exists" (a 404 is not a 412): an error at once."""
    import threading

    from promptmill.pipelines.batch.lease import Lease
    from promptmill.pipelines.storage import filesystem

    fs, root = filesystem("s3://pm-no-such-bucket/out", s3)
    raised: list[BaseException] = []

    def take() -> None:
        try:
            Lease(fs, root).acquire()
        except BaseException as e:  # noqa: BLE001 - what it raised is the assertion
            raised.append(e)

    t = threading.Thread(target=take, daemon=True)
    t.start()
    t.join(60)  # a hang guard, no speed claim
    assert not t.is_alive(), "acquire kept retrying its own create"
    assert raised and isinstance(raised[0], FileNotFoundError), raised
