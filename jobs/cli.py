"""The `promptmill` console script: dispatches subcommands to the modules in jobs/."""

from __future__ import annotations

import argparse
import logging
import sys

from jobs import dataset, eval_models, evaluate, export, generate, report, schedule, score, spec, stage_model, submit, train

COMMANDS = [generate, submit, schedule, score, evaluate, report, dataset, train, eval_models, export, spec, stage_model]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="promptmill", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS:
        cmd.add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
