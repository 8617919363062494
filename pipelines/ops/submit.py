"""Ray Jobs submission: the generate job shipped to a cluster through `JobSubmissionClient`.

The project travels as the job's `working_dir` (checkpoints included: relative paths in a spec resolve
there), the spec travels in an environment variable, and the submitter's S3 environment (AWS_*) goes
with it. The submission id is a hash of the spec and its output path, so submitting the same job twice
reports the first submission instead of running it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipelines.spec import JobSpec, spec_data, validated

log = logging.getLogger(__name__)
PROJECT = Path(__file__).resolve().parents[2]  # the checkout: pipelines/ops/submit.py
SPEC_ENV = "PROMPTMILL_SPEC"
# what the cluster does not need from a checkout (the venv alone is GBs); anchored at the checkout's root,
# since gitignore-style "runs" would also drop the code in pipelines/runs/
EXCLUDES = ["/.venv", "/.git", "/data", "/runs", "/logs", "**/__pycache__", "/.pytest_cache", "/.ruff_cache", "/docs",
            "*.egg-info"]
S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
          "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
AGENT_WAIT_S = 120


def submission_id(data: dict[str, Any]) -> str:
    """promptmill-<name>-<12 hex of the spec>: the same spec and output always get the same id."""
    spec = JobSpec.model_validate(data)
    digest = hashlib.blake2b(json.dumps(data, sort_keys=True, default=str).encode(), digest_size=6).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in spec.name)[:40]
    return f"promptmill-{safe}-{digest}"


def resolved_spec(source: str | Path | dict, overrides: list[str] | None = None) -> dict[str, Any]:
    """The spec as data with overrides applied, validated here (fail before submitting) but not filled with
    defaults: defaults such as the shipped checkpoints resolve on the cluster, inside its working_dir."""
    data, name = spec_data(source, overrides)
    validated(JobSpec, data, name)  # raises SpecError naming the field
    return data


def client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")


def submit(data: dict[str, Any], address: str | None = None) -> tuple[str, bool]:
    """Submit; returns (submission id, whether this call created it)."""
    sid = submission_id(data)
    c = client(address)
    env = {k: os.environ[k] for k in S3_ENV if k in os.environ}
    env[SPEC_ENV] = json.dumps(data)
    t0 = time.time()
    while True:
        try:
            c.submit_job(entrypoint=f"python -m jobs.cli generate env:{SPEC_ENV}", submission_id=sid,
                         runtime_env={"working_dir": str(PROJECT), "excludes": EXCLUDES, "env_vars": env},
                         metadata={"promptmill": "generate", "name": str(data.get("name", ""))})
            return sid, True
        except RuntimeError as e:
            if "already exists" in str(e):
                log.info("%s was already submitted (status %s); not submitting again", sid, c.get_job_status(sid))
                return sid, False
            # a head that just started has no job agent yet; Ray says to try again
            if "No available agent" not in str(e) or time.time() - t0 > AGENT_WAIT_S:
                raise
            time.sleep(2)


def wait(sid: str, address: str | None = None, timeout: float | None = None, poll: float = 2.0) -> str:
    c = client(address)
    t0 = time.time()
    while True:
        status = str(c.get_job_status(sid).value)
        if status in TERMINAL:
            return status
        if timeout is not None and time.time() - t0 > timeout:
            raise TimeoutError(f"job {sid} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def info(sid: str, address: str | None = None) -> dict[str, Any]:
    i = client(address).get_job_info(sid)
    return {"submission_id": sid, "status": str(i.status.value), "message": i.message, "entrypoint": i.entrypoint,
            "start_time": i.start_time, "end_time": i.end_time, "metadata": i.metadata}


def logs(sid: str, address: str | None = None, follow: bool = False) -> None:
    c = client(address)
    if not follow:
        print(c.get_job_logs(sid), end="")
        return
    import asyncio

    async def tail() -> None:
        async for chunk in c.tail_job_logs(sid):
            print(chunk, end="", flush=True)

    asyncio.run(tail())
