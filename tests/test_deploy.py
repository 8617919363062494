"""Deployment files: cluster.yaml passes Ray's own autoscaler validation; the KubeRay manifests pass KubeRay's CRD
schemas (vendored from the 1.7.0 release, unknown fields refused as `kubectl --validate=strict` does) and carry a
spec and a schedule that promptmill itself accepts; the Dockerfile they name builds what they need."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml
from promptmill.pipelines.ops.schedule import ScheduleSpec
from promptmill.pipelines.spec import SHIPPED, load_spec
from ray.autoscaler._private.util import fillout_defaults, validate_config

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_validation():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(fillout_defaults(config))
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1  # autoscaling GPU group, scales to zero
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("torch==2.13.0" in c for c in config["setup_commands"])
    assert "IamInstanceProfile" in gpu["node_config"]  # the workers write: they need the bucket role
    assert config["rsync_filter"] == [".gitignore"]  # .venv, data/, runs/ stay home
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {".venv/", "/data/", "/runs/"} <= set(ignored)


def test_a_broken_cluster_yaml_is_caught():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    bad = copy.deepcopy(config)
    bad["available_node_types"]["gpu_worker"]["max_worker"] = 8  # typo: not in Ray's schema
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fillout_defaults(bad))


def _docs(name: str) -> list[dict]:
    return list(yaml.safe_load_all((ROOT / "deploy" / "kuberay" / name).read_text()))


def test_rayjob_manifest_carries_a_valid_spec():
    config_map, rayjob = _docs("rayjob-generate.yaml")
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = load_spec(yaml.safe_load(config_map["data"]["spec.yaml"]))
    assert spec.models[0].resources.num_gpus == 1
    assert rayjob["spec"]["entrypoint"].endswith("/config/spec.yaml")
    workers = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["maxReplicas"] == spec.models[0].resources.max_actors
    limits = workers["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"


SCHEMAS = ROOT / "tests" / "schemas" / "kuberay-1.7.0"


def _strict(schema):
    """Refuse unknown fields where the CRD lists the known ones (kubectl --validate=strict; a typo such as
    enableInTreeAutoscalling would otherwise be pruned without a word)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def _validate(doc: dict) -> None:
    schema = _strict(json.loads((SCHEMAS / f"{doc['kind']}.json").read_text()))
    jsonschema.Draft7Validator(schema).validate(doc)


def _cluster_specs(doc: dict) -> dict:
    spec = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
    return spec["rayClusterSpec"]


@pytest.mark.parametrize("name", ["rayjob-generate.yaml", "raycronjob-schedule.yaml"])
def test_kuberay_manifests_pass_the_crd_schemas_with_autoscaling_token_auth_and_our_image(name):
    config_map, doc = _docs(name)
    assert config_map["kind"] == "ConfigMap"
    _validate(doc)
    cluster = _cluster_specs(doc)
    assert cluster["enableInTreeAutoscaling"] is True and cluster["authOptions"] == {"mode": "token"}
    assert cluster["rayVersion"] == _pinned_ray()
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    images = {c["image"] for p in pods for c in p["spec"]["containers"]}
    assert len(images) == 1 and re.fullmatch(r"[a-z0-9.\-/]+/promptmill:[\w.\-]+-gpu", images.pop())
    for p in pods:  # every pod writes to the bucket: every pod has the bucket role
        assert p["spec"]["serviceAccountName"] == "promptmill"
    job = doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]
    # a job waiting on GPU nodes cannot wait forever; neither can the whole job, nor its submitter's retries
    assert 0 < job["preRunningDeadlineSeconds"] < job["activeDeadlineSeconds"]
    assert job["backoffLimit"] >= 1 and job["submitterConfig"]["backoffLimit"] >= 1
    bad = copy.deepcopy(doc)
    (bad["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else bad["spec"])["preRunningDeadlineSeconds"] = 0
    with pytest.raises(jsonschema.ValidationError):  # the CRD's minimum: 1
        _validate(bad)
    bad = copy.deepcopy(doc)
    _cluster_specs(bad)["enableInTreeAutoscalling"] = True  # typo
    with pytest.raises(jsonschema.ValidationError, match="enableInTreeAutoscalling"):
        _validate(bad)
    bad = copy.deepcopy(doc)
    _cluster_specs(bad)["workerGroupSpecs"][0]["maxReplicas"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        _validate(bad)


def test_raycronjob_runs_a_valid_schedule_at_its_cron_on_its_own_cluster():
    config_map, cron = _docs("raycronjob-schedule.yaml")
    sched = ScheduleSpec.model_validate(yaml.safe_load(config_map["data"]["schedule.yaml"]))
    assert cron["spec"]["schedule"] == sched.cron and cron["spec"]["timeZone"] == sched.timezone
    entry = cron["spec"]["jobTemplate"]["entrypoint"].split()
    assert entry[:2] == ["promptmill", "schedule"] and "--once" in entry
    assert sched.submit_address is None  # the job runs on the RayJob's own cluster
    for m in sched.models:  # shipped:NAME: the image's own checkpoints, wherever the image installed promptmill
        assert Path(m.checkpoint).parent == SHIPPED and (Path(m.checkpoint) / "config.json").is_file()
    values = yaml.safe_load((ROOT / "deploy" / "kuberay" / "operator-values.yaml").read_text())
    assert {"name": "RayCronJob", "enabled": True} in values["featureGates"]  # alpha: off by default


def _pinned_ray() -> str:
    """The Ray the image and clusters run: the highest of pyproject's range that `make test-ray-range` tests."""
    return re.search(r"^RAY_HIGHEST := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


def _dockerfile() -> tuple[str, list[str]]:
    text = (ROOT / "Dockerfile").read_text()
    return text, [ln for ln in text.replace("\\\n", " ").splitlines() if ln.strip() and not ln.startswith("#")]


def test_dockerfile_lint():
    """What a build on a machine with docker would find late: a base image that is not pinned or not this Ray,
    a COPY of something missing or left out by .dockerignore, another torch than the Makefile's, root."""
    text, lines = _dockerfile()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    assert args["RAY_VERSION"] == _pinned_ray()
    assert args["TORCH_VERSION"] in (ROOT / "Makefile").read_text()  # pip install torch==2.13.0
    base = next(ln for ln in lines if ln.startswith("FROM "))
    assert base == "FROM rayproject/ray:${RAY_VERSION}-py311-${VARIANT}" and "latest" not in base
    allowed = {ln[1:] for ln in (ROOT / ".dockerignore").read_text().split() if ln.startswith("!")}
    for ln in lines:
        if ln.startswith("COPY "):
            for src in [w for w in ln.split()[1:-1] if not w.startswith("--")]:
                assert (ROOT / src).exists() and src in allowed, src
    assert {"promptmill", "pipelines", "models", "jobs", "pyproject.toml"} <= allowed
    assert lines[-1] == "USER ray" and "HF_HUB_OFFLINE=1" in text
    assert all(p in text for p in ("pip install", '-e ".[diffusers]"'))


def _docker_works() -> bool:
    return shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _docker_works(), reason="no docker daemon here")
def test_the_image_builds_and_runs_the_demo(tmp_path):
    tag = "promptmill-test:cpu"
    subprocess.run(["docker", "build", "-t", tag, "--build-arg", "VARIANT=cpu", str(ROOT)], check=True)
    run = subprocess.run(["docker", "run", "--rm", tag, "promptmill", "generate", "examples/demo.yaml",
                          "--set", "input.limit=4", "--set", "output.path=/tmp/demo/"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
