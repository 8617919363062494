"""promptmill submit SPEC.yaml [--no-wait]; status / logs / stop / delete ID; list. As `ray job submit` does:
logs stream until the job ends (exit 0 only if it SUCCEEDED), --address or $RAY_API_SERVER_ADDRESS names the
Jobs API (an http(s) $RAY_ADDRESS is the fallback)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml
from promptmill.jobs import error, json_object

ADDRESS = {"default": None, "help": "the cluster's Jobs API (dashboard), e.g. http://HOST:8265 (default: "
           "$RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS if it is an http(s) URL)"}


def _verify(text: str) -> bool | str:
    """`--verify` as `ray job` reads it: true / false, or a CA bundle file or directory."""
    return {"true": True, "false": False}.get(text.lower(), text)


def add_connection(p: argparse.ArgumentParser) -> None:
    """How every command reaches the Jobs API, spelled as `ray job` spells it."""
    p.add_argument("--address", **ADDRESS)
    p.add_argument("--headers", type=json_object, default=None, metavar="JSON",
                   help='HTTP headers for the Jobs API as a JSON object (an auth proxy\'s), default $RAY_JOB_HEADERS')
    p.add_argument("--verify", type=_verify, default=True, metavar="true|false|CA_PATH",
                   help="verify the Jobs API's TLS certificate (true), not (false), or against this CA bundle")


def connection(args: argparse.Namespace) -> dict:
    headers = args.headers
    if headers is None and os.environ.get("RAY_JOB_HEADERS"):
        headers = json_object(os.environ["RAY_JOB_HEADERS"])
    return {"headers": headers, "verify": args.verify}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("submit", help="submit the generate job to a Ray cluster (Ray Jobs) and stream its logs")
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    add_connection(p)
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of streaming the logs")
    p.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    p.add_argument("--timeout", type=float, default=None, help="seconds to stream before giving up (exit 1)")
    p.add_argument("--dry-run", action="store_true", help="print what would be shipped to the cluster; submit nothing")
    p.add_argument("--pass-aws-credentials", action="store_true",
                   help="send your AWS_ACCESS_KEY_ID / SECRET / SESSION_TOKEN with the job (readable through the Jobs "
                        "API; by default the cluster's own identity is used)")
    p.add_argument("--max-file-mb", type=float, default=None, help="refuse to ship any file bigger than this (256)")
    p.add_argument("--runtime-env", type=Path, default=None, help="a YAML/JSON runtime_env merged into the job's "
                   "(pip, env_vars, ...; the job's working_dir and spec variable are promptmill's)")
    p.add_argument("--runtime-env-json", type=json_object, default=None, help="the same, inline JSON")
    p.add_argument("--metadata-json", type=json_object, default=None,
                   help='JSON object of job metadata, e.g. \'{"team": "ads"}\'')
    p.add_argument("--entrypoint-num-cpus", type=float, default=None)
    p.add_argument("--entrypoint-num-gpus", type=float, default=None)
    p.add_argument("--entrypoint-memory", type=int, default=None, help="bytes")
    p.add_argument("--entrypoint-resources", type=json_object, default=None, metavar="JSON",
                   help='custom resources the driver needs, e.g. \'{"head_slot": 1}\'')
    p.set_defaults(func=main_submit)
    for name, text, func in (("status", "status and progress of a submitted job", main_status),
                             ("logs", "logs of a submitted job", main_logs),
                             ("stop", "stop a submitted job", main_stop),
                             ("delete", "delete a finished job's record from the cluster", main_delete)):
        s = sub.add_parser(name, help=text)
        s.add_argument("id")
        add_connection(s)
        if name == "logs":
            s.add_argument("--follow", action="store_true", help="stream until the job ends")
        s.set_defaults(func=func)
    ls = sub.add_parser("list", help="promptmill's jobs on the cluster")
    add_connection(ls)
    ls.set_defaults(func=main_list)


def _passthrough(args: argparse.Namespace) -> dict:
    renv = {}
    if args.runtime_env:
        renv = yaml.safe_load(args.runtime_env.read_text()) or {}
        if not isinstance(renv, dict):
            raise ValueError(f"--runtime-env {args.runtime_env}: wants a mapping")
    renv = {**renv, **(args.runtime_env_json or {})}
    meta = args.metadata_json or {}
    entry = {k: v for k in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory", "entrypoint_resources")
             if (v := getattr(args, k)) is not None}
    return {"runtime_env": renv, "metadata": {str(k): str(v) for k, v in meta.items()}, **entry}


def main_submit(args: argparse.Namespace) -> int:
    from promptmill.pipelines.ops.submit import MAX_FILE_MB, info, logs, resolved_spec, shipped_files, submit
    from promptmill.pipelines.spec import SpecError

    cap = args.max_file_mb or MAX_FILE_MB
    try:
        data = resolved_spec(args.spec, args.overrides)
        files = shipped_files(data, cap)
        extra = _passthrough(args)
    except (SpecError, ValueError, OSError) as e:
        return error(e)
    if args.dry_run:
        for rel, size in files:
            print(f"{size:>12,}  {rel}")
        print(f"{sum(s for _, s in files):>12,}  total, {len(files)} files would be shipped; nothing submitted")
        return 0
    sid, created = submit(data, args.address, args.pass_aws_credentials, cap, connection=connection(args), **extra)
    print(f"{sid} {'submitted' if created else 'already submitted'}", flush=True)
    if args.no_wait:
        return 0
    try:
        logs(sid, args.address, follow=True, timeout=args.timeout, **connection(args))
    except TimeoutError as e:
        return error(e)
    status = info(sid, args.address, **connection(args))["status"]
    print(f"{sid} {status}")
    return 0 if status == "SUCCEEDED" else 1


def main_status(args: argparse.Namespace) -> int:
    from promptmill.pipelines.ops.submit import info

    print(json.dumps(info(args.id, args.address, **connection(args)), indent=2, default=str))
    return 0


def main_logs(args: argparse.Namespace) -> int:
    from promptmill.pipelines.ops.submit import logs

    logs(args.id, args.address, args.follow, **connection(args))
    return 0


def main_stop(args: argparse.Namespace) -> int:
    from promptmill.pipelines.ops.submit import stop

    print(f"{args.id} {'stop requested' if stop(args.id, args.address, **connection(args)) else 'was not running'}")
    return 0


def main_delete(args: argparse.Namespace) -> int:
    from promptmill.pipelines.ops.submit import delete

    print(f"{args.id} {'deleted' if delete(args.id, args.address, **connection(args)) else 'not deleted'}")
    return 0


def main_list(args: argparse.Namespace) -> int:
    from promptmill.pipelines.ops.submit import jobs

    for j in jobs(args.address, **connection(args)):
        print(f"{j['submission_id']}\t{j['status']}\t{j['name']}\tattempt {j['attempt'] or 1}")
    return 0
