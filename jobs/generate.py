"""promptmill generate SPEC.yaml [--set key=value ...]: run the generate job (embedded Ray or RAY_ADDRESS)."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os

from promptmill.jobs import error


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="prompt Parquet -> images, metadata and summary")
    p.add_argument("spec", help="job spec YAML, or env:NAME for a JSON spec in that variable (Ray Jobs)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set models.0.images_per_prompt=4")
    p.add_argument("--allow-subset", action="store_true",
                   help="write into an output that holds models this spec leaves out (their images stay)")
    p.add_argument("--dry-run", action="store_true", help="preflight and plan (rows, rejected, images per model, what "
                   "the output already holds) as JSON; nothing is written")
    # the old spelling of the global `--log-level DEBUG` (which prints the traceback behind an error): kept for a release
    p.add_argument("--verbose", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import traceback

    from promptmill.pipelines.batch.job import JobFailed, PreflightError, StorageError, run_job
    from promptmill.pipelines.spec import SpecError, load_spec

    try:
        source = json.loads(os.environ[args.spec[4:]]) if args.spec.startswith("env:") else args.spec
        spec = load_spec(source, args.overrides)
        if args.dry_run:
            from promptmill.pipelines.batch.dry_run import dry_run

            print(json.dumps(dry_run(spec, allow_subset=args.allow_subset), indent=2))
            return 0
        result = run_job(spec, allow_subset=args.allow_subset)
    except (SpecError, PreflightError, JobFailed, StorageError) as e:
        if args.verbose:
            logging.getLogger("promptmill").warning("generate --verbose is deprecated: use promptmill --log-level DEBUG")
        if args.verbose or logging.getLogger().isEnabledFor(logging.DEBUG):
            traceback.print_exc()
        # 2: bad spec or input, nothing done; 3: storage gave up (the same command resumes); 1: the job failed
        return error(e, code=3 if isinstance(e, StorageError) else 1 if isinstance(e, JobFailed) else 2)
    print(result.line(), flush=True)
    # the job is done and its output written: keep the interpreter's collection at exit from walking every
    # object Ray, pyarrow and torch made (1.0-1.2 s of exit, 0.2 s with this; benchmarks/startup.py)
    gc.freeze()
    return 0
