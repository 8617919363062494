"""Entry points: the only things a user runs (`promptmill <command>`)."""

from __future__ import annotations

import argparse
import json


def error(e: Exception, code: int = 2) -> int:
    """One line on stderr, secrets redacted (messages can quote URLs and spec values); returns the exit code."""
    import sys

    from promptmill.pipelines.redaction import redact_text

    print(f"promptmill: error: {redact_text(str(e))}", file=sys.stderr)
    return code


def json_object(text: str) -> dict:
    """An argparse `type`: a JSON object, or an error argparse reports naming the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"wants a JSON object, got {type(value).__name__}")
    return value


def add_storage_options(p: argparse.ArgumentParser, what: str) -> None:
    """`--storage-options JSON`, the one spelling of fsspec options on every command (s3fs: endpoint_url, anon, ...;
    AWS_* come from the environment)."""
    p.add_argument("--storage-options", type=json_object, default={}, metavar="JSON",
                   help=f'fsspec options for {what} as a JSON object, e.g. \'{{"endpoint_url": "http://minio:9000"}}\'')
