"""Deployment files: cluster.yaml passes Ray's own autoscaler validation; the KubeRay manifests carry a
spec and a schedule that promptmill itself accepts."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

from pipelines.ops.schedule import ScheduleSpec
from pipelines.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_validation():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(fillout_defaults(config))
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 and gpu["max_workers"] >= 1  # autoscaling GPU group, scales to zero
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert any("torch==2.13.0" in c for c in config["setup_commands"])


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


def test_cronjob_manifest_fires_a_valid_schedule_at_its_cron():
    config_map, cronjob = _docs("cronjob-schedule.yaml")
    assert cronjob["kind"] == "CronJob"
    sched = ScheduleSpec.model_validate(yaml.safe_load(config_map["data"]["schedule.yaml"]))
    assert cronjob["spec"]["schedule"] == sched.cron and cronjob["spec"]["timeZone"] == sched.timezone
    command = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["promptmill", "schedule"] and "--once" in command
    assert sched.submit_address
