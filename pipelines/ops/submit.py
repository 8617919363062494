"""Ray Jobs submission: the generate job shipped to a cluster through `JobSubmissionClient`.

What travels is an allow-list, never the checkout: the three packages under their import name
(`promptmill/pipelines/...`, whatever folders they were installed from), `pyproject.toml` and the checkpoint
directories the spec references by relative path (`shipped_files`; `--dry-run` prints it), each file under a
size cap. The spec travels in an environment variable, which Ray keeps in JobInfo for anyone who can reach
the Jobs API: so it must hold no secrets (`${ENV_VAR}` references resolve on the cluster), and credentials
come from the cluster's own identity (instance profile, IRSA, the nodes' environment); the submitter's AWS
keys go only with `--pass-aws-credentials`. The submission id is a hash of the spec and its output path, so
submitting the same job twice reports the first submission instead of running it again; once that attempt has
ended FAILED or STOPPED, submitting again makes the next attempt (`<id>-a2`, `-a3`, ...; `attempt` in its
metadata), still one at a time. Addresses as Ray documents them: `--address` / `RAY_API_SERVER_ADDRESS` name the
Jobs API (falling back to an http(s) `RAY_ADDRESS`), `RAY_ADDRESS` the cluster a driver joins.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from promptmill.pipelines.redaction import literal_secrets
from promptmill.pipelines.spec import SPEC_PATHS, JobSpec, SpecError, resolve_env, rewrite_paths, spec_data, validated

import promptmill

log = logging.getLogger(__name__)
PROJECT = Path(__file__).resolve().parents[2]  # where the packages are: a checkout, or site-packages/promptmill in a wheel
PACKAGE_INIT = Path(promptmill.__file__).resolve()  # promptmill/__init__.py, beside the packages or above them
IMPORT_NAME = "promptmill"  # the working_dir holds the packages under it, as an install does
SPEC_ENV = "PROMPTMILL_SPEC"
PACKAGES = ("jobs", "pipelines", "models")
PACKAGE_FILES = (".py", ".md", ".yaml")  # code, docs beside it, the recipe configs
MAX_FILE_MB = 256  # a shipped checkpoint is ~10 MB; anything this big is a mistake (a dataset, a venv's wheel)
# not secret: where S3 is and which region; keys and tokens travel only with --pass-aws-credentials
AWS_PLACE_ENV = ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
AWS_SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
RETRIABLE = ("FAILED", "STOPPED")  # an attempt that ended so may be submitted again
AGENT_WAIT_S = 120


def submission_id(data: dict[str, Any]) -> str:
    """promptmill-<name>-<12 hex of the spec>: the same spec and output always get the same id."""
    spec = JobSpec.model_validate(data)
    digest = hashlib.blake2b(json.dumps(data, sort_keys=True, default=str).encode(), digest_size=6).hexdigest()
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in spec.name)[:40]
    return f"promptmill-{safe}-{digest}"


def resolved_spec(source: str | Path | dict, overrides: list[str] | None = None) -> dict[str, Any]:
    """The spec as data with overrides applied, validated here (fail before submitting) but not filled with
    defaults (the shipped checkpoints resolve on the cluster, inside its working_dir) and with its `${ENV_VAR}`
    references kept (they resolve on the cluster). A secret written out in it is refused."""
    data, name = spec_data(source, overrides)
    validated(JobSpec, resolve_env(data, placeholder="x"), name)  # raises SpecError naming the field
    refuse_literal_secrets(data, name)
    return project_relative(data)


def project_relative(data: dict[str, Any]) -> dict[str, Any]:
    """Copy of `data` whose local paths inside the project are relative to it: they travel in the working_dir
    and resolve there on the cluster (the job's cwd), whatever folder the spec file was in here."""
    root = PROJECT.resolve()

    def relative(v: Any) -> Any:
        inside = isinstance(v, str) and os.path.isabs(v) and root in Path(v).resolve().parents
        return travel_path(Path(v).resolve()) if inside else v

    data = copy.deepcopy(data)
    rewrite_paths(data, SPEC_PATHS["spec"], relative)
    return data


def refuse_literal_secrets(data: dict[str, Any], name: str = "spec") -> None:
    secrets = literal_secrets(data)
    if secrets:
        raise SpecError(f"{name}: {', '.join(secrets)} hold a secret written out; a submitted spec is readable by "
                        "anyone who can reach the cluster's Jobs API. Reference a variable the cluster has instead, "
                        "e.g. secret: ${AWS_SECRET_ACCESS_KEY}, or leave credentials to the cluster's identity")


def travel_path(path: Path) -> str:
    """Where a file or folder inside the project sits in the working_dir: a package's under its import name
    (`models/checkpoints/gan` -> `promptmill/models/checkpoints/gan`, where `shipped:gan` resolves on the
    cluster), anything else at its path relative to the project."""
    if path == PACKAGE_INIT:
        return f"{IMPORT_NAME}/__init__.py"
    rel = path.relative_to(PROJECT if path.is_relative_to(PROJECT) else PROJECT.resolve())
    return f"{IMPORT_NAME}/{rel}" if rel.parts and rel.parts[0] in PACKAGES else str(rel)


def source_path(travel: str) -> Path:
    """The file here that `travel_path` placed at `travel` in the working_dir."""
    if travel == f"{IMPORT_NAME}/__init__.py":
        return PACKAGE_INIT
    return PROJECT / travel.removeprefix(f"{IMPORT_NAME}/")


def files_under(folder: Path) -> list[Path]:
    """Every file under `folder`, following links only where they stay inside the project: a link out of it
    (`creds -> ~/.aws/credentials`) would ship what it points at, so it is a SpecError naming link and target."""
    project, out, seen = PROJECT.resolve(), [], set()
    for top, dirs, names in os.walk(folder, followlinks=True):
        real = Path(top).resolve()
        if real in seen:  # a link back up the tree: walked once
            dirs[:] = []
            continue
        seen.add(real)
        for name in [*dirs, *names]:
            p = Path(top, name)
            if p.is_symlink() and not p.resolve().is_relative_to(project):
                raise SpecError(f"{p} is a link to {p.resolve()}, outside the project {project}; submit never follows "
                                "a link out of it. Copy the file in (or remove the link) if it is meant to travel")
        out += [Path(top, n) for n in names if Path(top, n).is_file()]
    return sorted(out)


def shipped_files(data: dict[str, Any], max_file_mb: float = MAX_FILE_MB) -> list[tuple[str, int]]:
    """(path in the working_dir, bytes) of everything the job's working_dir holds: the packages, the
    project file, and the checkpoints the spec names by relative path (the shipped scorers when it leaves
    scoring at its defaults). Raises SpecError naming a referenced checkpoint that is not in the project or a
    file over the size cap."""
    spec = JobSpec.model_validate(resolve_env(data, placeholder="x"))
    roots = [PROJECT / p for p in PACKAGES]
    files = [f for r in roots for f in files_under(r) if f.suffix in PACKAGE_FILES
             and "__pycache__" not in f.parts] + [PACKAGE_INIT]
    if (PROJECT / "pyproject.toml").is_file():  # a checkout; a wheel install has the packages only
        files.append(PROJECT / "pyproject.toml")
    refs = [(f"models[{i}].checkpoint", m.checkpoint) for i, m in enumerate(spec.models)]
    if spec.scoring.enabled:
        refs += [(f"scoring.{k}", getattr(spec.scoring, k)) for k in ("clip", "judge", "aesthetic")
                 if getattr(spec.scoring, k)]
    refs += [(f"models[{i}].loras[{j}].path", x.path) for i, m in enumerate(spec.models) for j, x in enumerate(m.loras)]
    for where, ref in refs:
        if "://" in ref:
            continue  # an object-store URL: nothing to ship
        d = (PROJECT / ref).resolve()  # a default (the shipped scorers) is absolute, inside the project
        if Path(ref).is_absolute() and PROJECT.resolve() not in d.parents:
            continue  # a path the cluster's nodes have
        if not d.is_dir() or PROJECT.resolve() not in d.parents:
            raise SpecError(f"{where}: {ref!r} is not a checkpoint directory inside the project, so it cannot travel "
                            "with the job; use an object-store URL")
        files += files_under(d)
    out = []
    for f in sorted(set(files)):
        size = f.stat().st_size
        if size > max_file_mb * 2**20:
            raise SpecError(f"{travel_path(f)} is {size / 2**20:.0f} MB, over the {max_file_mb:g} MB "
                            "cap on a shipped file; put it in object storage and reference its URL")
        out.append((travel_path(f), size))
    return sorted(out)


def stage_working_dir(files: list[tuple[str, int]]) -> str:
    """A temporary directory holding exactly `files` (Ray zips and uploads it); the caller removes it."""
    tmp = tempfile.mkdtemp(prefix="promptmill-submit-")
    for rel, _ in files:
        dest = Path(tmp, rel)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source_path(rel), dest)
    return tmp


def jobs_api_address(address: str | None = None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS when it is a dashboard URL (Ray's own order)."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    return (address or os.environ.get("RAY_API_SERVER_ADDRESS")
            or (ray_address if ray_address.startswith(("http://", "https://")) else None) or "http://127.0.0.1:8265")


def client(address: str | None, headers: dict[str, str] | None = None, verify: bool | str = True):
    """The Jobs API client, reached as `ray job` reaches it: `headers` (an auth proxy's), `verify` (TLS: a bool or a CA
    bundle path)."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(jobs_api_address(address), headers=headers, verify=verify)


def attempt_id(base: str, attempt: int) -> str:
    return base if attempt == 1 else f"{base}-a{attempt}"


def latest_attempt(c, base: str) -> tuple[int, str | None]:
    """(attempt number, status) of the newest submission of `base`; (0, None) when there is none."""
    attempts = {}
    for job in c.list_jobs():
        sid = job.submission_id or ""
        if sid == base:
            attempts[1] = job
        elif sid.startswith(f"{base}-a") and sid[len(base) + 2:].isdigit():
            attempts[int(sid[len(base) + 2:])] = job
    if not attempts:
        return 0, None
    n = max(attempts)
    return n, str(attempts[n].status.value)


def job_env(data: dict[str, Any], pass_aws_credentials: bool = False) -> dict[str, str]:
    """The job's environment variables (stored in JobInfo, readable through the Jobs API)."""
    names = AWS_PLACE_ENV + (AWS_SECRET_ENV if pass_aws_credentials else ())
    if pass_aws_credentials:
        log.warning("--pass-aws-credentials: your AWS keys travel in the job's runtime_env, readable by anyone who "
                    "can reach this cluster's Jobs API or dashboard; prefer the cluster's own IAM identity")
    env = {k: os.environ[k] for k in names if k in os.environ}
    env[SPEC_ENV] = json.dumps(data)
    return env


def submit(data: dict[str, Any], address: str | None = None, pass_aws_credentials: bool = False,
           max_file_mb: float = MAX_FILE_MB, runtime_env: dict[str, Any] | None = None,
           metadata: dict[str, str] | None = None, connection: dict[str, Any] | None = None,
           **entrypoint: Any) -> tuple[str, bool]:
    """Submit; returns (submission id, whether this call created it). `runtime_env` and `metadata` are merged
    into ours (our working_dir and spec variable win); `entrypoint` takes Ray's entrypoint_num_gpus,
    entrypoint_resources etc.; `connection`: `client`'s headers and verify."""
    refuse_literal_secrets(data)  # schedules submit without going through resolved_spec
    data = project_relative(data)
    base = submission_id(data)
    c = client(address, **(connection or {}))
    env = job_env(data, pass_aws_credentials)
    working_dir = stage_working_dir(shipped_files(data, max_file_mb))
    renv = {**(runtime_env or {}), "working_dir": working_dir,
            "env_vars": {**(runtime_env or {}).get("env_vars", {}), **env}}
    meta = {**(metadata or {}), "promptmill": "generate", "name": str(data.get("name", ""))}
    try:
        return _submit(c, base, renv, meta, entrypoint)
    finally:
        shutil.rmtree(working_dir, ignore_errors=True)


def _submit(c, base: str, runtime_env: dict, metadata: dict, entrypoint: dict) -> tuple[str, bool]:
    t0 = time.time()
    while True:
        try:
            n, status = latest_attempt(c, base)
            if status is not None and status not in RETRIABLE:
                log.info("%s was already submitted (status %s); not submitting again", attempt_id(base, n), status)
                return attempt_id(base, n), False
            sid = attempt_id(base, n + 1)
            if n:
                log.info("%s ended %s: submitting attempt %d as %s", attempt_id(base, n), status, n + 1, sid)
            c.submit_job(entrypoint=f"python -m promptmill.jobs.cli generate env:{SPEC_ENV}", submission_id=sid,
                         runtime_env=runtime_env, metadata={**metadata, "attempt": str(n + 1)}, **entrypoint)
            return sid, True
        except RuntimeError as e:
            if "already exists" in str(e):  # another submitter made this attempt a moment ago
                continue
            # a head that just started has no job agent yet; Ray says to try again
            if "No available agent" not in str(e) or time.time() - t0 > AGENT_WAIT_S:
                raise
            time.sleep(2)


def info(sid: str, address: str | None = None, **connection: Any) -> dict[str, Any]:
    """The job's status, and its driver's last progress line (from its log: images done / total, img/s, ETA)."""
    from promptmill.pipelines.batch.progress import PREFIX

    c = client(address, **connection)
    i = c.get_job_info(sid)
    lines = [ln for ln in c.get_job_logs(sid).splitlines() if PREFIX in ln]
    return {"submission_id": sid, "status": str(i.status.value), "message": i.message, "entrypoint": i.entrypoint,
            "start_time": i.start_time, "end_time": i.end_time, "metadata": i.metadata,
            "progress": lines[-1][lines[-1].rindex(PREFIX) + len(PREFIX):] if lines else None}


def logs(sid: str, address: str | None = None, follow: bool = False, timeout: float | None = None,
         **connection: Any) -> None:
    """Print the job's log; with `follow`, stream it until the job ends (TimeoutError after `timeout` s)."""
    c = client(address, **connection)
    if not follow:
        print(c.get_job_logs(sid), end="")
        return
    import asyncio

    async def tail() -> None:
        async for chunk in c.tail_job_logs(sid):
            print(chunk, end="", flush=True)

    async def bounded() -> None:
        try:
            await asyncio.wait_for(tail(), timeout)
        except TimeoutError as e:
            raise TimeoutError(f"job {sid} still running after {timeout:.0f} s") from e

    asyncio.run(bounded())


def stop(sid: str, address: str | None = None, **connection: Any) -> bool:
    return client(address, **connection).stop_job(sid)


def delete(sid: str, address: str | None = None, **connection: Any) -> bool:
    """Remove a finished job's record (Ray refuses one still running)."""
    return client(address, **connection).delete_job(sid)


def jobs(address: str | None = None, **connection: Any) -> list[dict[str, Any]]:
    """promptmill's submissions on the cluster, oldest first."""
    found = [j for j in client(address, **connection).list_jobs() if (j.metadata or {}).get("promptmill") == "generate"]
    return [{"submission_id": j.submission_id, "status": str(j.status.value), "name": j.metadata.get("name"),
             "attempt": j.metadata.get("attempt"), "start_time": j.start_time, "end_time": j.end_time}
            for j in sorted(found, key=lambda j: j.start_time or 0)]
