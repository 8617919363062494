"""promptmill submit SPEC.yaml --address URL [--wait]; promptmill status ID; promptmill logs ID [--follow]."""

from __future__ import annotations

import argparse
import json

from jobs import error


def add_parser(sub: argparse._SubParsersAction) -> None:
    addr = {"default": None, "help": "Ray dashboard, e.g. http://HOST:8265 (default: $RAY_ADDRESS)"}
    p = sub.add_parser("submit", help="submit the generate job to a Ray cluster (Ray Jobs)")
    p.add_argument("spec", help="job spec YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--address", **addr)
    p.add_argument("--wait", action="store_true", help="wait for the job; exit 0 only if it SUCCEEDED")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait")
    p.add_argument("--dry-run", action="store_true", help="print what would be shipped to the cluster; submit nothing")
    p.add_argument("--pass-aws-credentials", action="store_true",
                   help="send your AWS_ACCESS_KEY_ID / SECRET / SESSION_TOKEN with the job (readable through the Jobs "
                        "API; by default the cluster's own identity is used)")
    p.add_argument("--max-file-mb", type=float, default=None, help="refuse to ship any file bigger than this (256)")
    p.set_defaults(func=main_submit)
    s = sub.add_parser("status", help="status of a submitted job")
    s.add_argument("id")
    s.add_argument("--address", **addr)
    s.set_defaults(func=main_status)
    lg = sub.add_parser("logs", help="logs of a submitted job")
    lg.add_argument("id")
    lg.add_argument("--address", **addr)
    lg.add_argument("--follow", action="store_true", help="stream until the job ends")
    lg.set_defaults(func=main_logs)


def main_submit(args: argparse.Namespace) -> int:
    from pipelines.ops.submit import MAX_FILE_MB, resolved_spec, shipped_files, submit, wait
    from pipelines.spec import SpecError

    cap = args.max_file_mb or MAX_FILE_MB
    try:
        data = resolved_spec(args.spec, args.overrides)
        files = shipped_files(data, cap)
    except SpecError as e:
        return error(e)
    if args.dry_run:
        for rel, size in files:
            print(f"{size:>12,}  {rel}")
        print(f"{sum(s for _, s in files):>12,}  total, {len(files)} files would be shipped; nothing submitted")
        return 0
    sid, created = submit(data, args.address, args.pass_aws_credentials, cap)
    print(f"{sid} {'submitted' if created else 'already submitted'}")
    if not args.wait:
        return 0
    status = wait(sid, args.address, args.timeout)
    print(f"{sid} {status}")
    return 0 if status == "SUCCEEDED" else 1


def main_status(args: argparse.Namespace) -> int:
    from pipelines.ops.submit import info

    print(json.dumps(info(args.id, args.address), indent=2, default=str))
    return 0


def main_logs(args: argparse.Namespace) -> int:
    from pipelines.ops.submit import logs

    logs(args.id, args.address, args.follow)
    return 0
