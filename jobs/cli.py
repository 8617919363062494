"""The `promptmill` console script: dispatches subcommands to the modules in jobs/."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

from promptmill.jobs import (
    dataset,
    deliver,
    error,
    eval_models,
    evaluate,
    export,
    generate,
    report,
    review,
    schedule,
    score,
    spec,
    stage_model,
    submit,
    train,
)

COMMANDS = [generate, submit, schedule, review, deliver, score, evaluate, report, dataset, train, eval_models, export, spec,
            stage_model]
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _version() -> str:
    try:
        return version("promptmill")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="promptmill", description=__doc__)
    parser.add_argument("--version", action="version", version=f"promptmill {_version()}")
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=LEVELS,
                        help="DEBUG also prints the traceback behind a one-line error")
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return error(RuntimeError("interrupted"), code=130)
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line, the traceback on request
        logging.getLogger("promptmill").debug("traceback", exc_info=True)
        return error(RuntimeError(_explain(e)), code=1)


def _explain(e: Exception) -> str:
    """What an unexpected error means to a user, in one line."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    name = type(e).__name__
    if name == "ConnectionError" or "Failed to connect to" in text or "Connection refused" in text:
        return f"cannot reach the cluster's Jobs API ({text[:300]}); check --address / RAY_API_SERVER_ADDRESS"
    return f"{name}: {text[:500]} (--log-level DEBUG prints the traceback)"


if __name__ == "__main__":
    sys.exit(main())
