"""promptmill schedule SCHEDULE.yaml [--once [--at ISO_TIME]] [--dry-run]: scheduled ad-creative batches."""

from __future__ import annotations

import argparse
import datetime as dt
import json

from promptmill.jobs import error


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("schedule", help="render catalog x templates on a cron schedule and generate each fire")
    p.add_argument("schedule", help="schedule YAML")
    p.add_argument("--once", action="store_true", help="fire one slot and exit (tests, backfills, k8s CronJobs)")
    p.add_argument("--at", default=None, help="with --once: fire the slot at or before this ISO time (default: now)")
    p.add_argument("--dry-run", action="store_true", help="print the rendered prompts and the plan; generate nothing")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from promptmill.pipelines.batch.read import InputError
    from promptmill.pipelines.ops.schedule import due_slots, fire, load_schedule, run_forever, slot_at_or_before
    from promptmill.pipelines.spec import SpecError

    if args.at and not (args.once or args.dry_run):
        return error(ValueError("--at names the slot to fire once: add --once (or --dry-run); without them "
                                "schedule runs forever from now"))
    try:
        s = load_schedule(args.schedule)
        if args.once or args.dry_run:
            at = dt.datetime.fromisoformat(args.at) if args.at else dt.datetime.now(dt.UTC)
            slot = slot_at_or_before(s, at)
            print(json.dumps(fire(s, slot, dry_run=args.dry_run), default=str))
            return 0
    except (SpecError, InputError) as e:
        return error(e)
    print(json.dumps({"schedule": s.name, "due now": [str(t) for t in due_slots(s, dt.datetime.now(dt.UTC))]}))
    run_forever(s)
    return 0
