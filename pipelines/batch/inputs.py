"""The input manifest: the input files an output was drawn from (URL, size, rows and the fingerprint the filesystem
gives: S3's ETag, a local file's mtime), recorded by each run that commits, and what changed since.

A file added to the input is simply drawn: its rows are samples the output does not hold yet. A file that changed
(size, fingerprint or rows) or was removed is reported, in the log and in summary.json, and never redrawn: its rows'
samples keep the keys they were written under, so resume counts them as done.
"""

from __future__ import annotations

import logging
from dataclasses import asdict

from fsspec import AbstractFileSystem
from promptmill.pipelines.batch.read import InputFile, InputPlan
from promptmill.pipelines.layout import INPUTS
from promptmill.pipelines.redaction import redact_text
from promptmill.pipelines.storage import join, read_json, write_json

log = logging.getLogger(__name__)
SHOWN = 20  # files named per kind of change in the log; summary.json lists them all


def manifest(plan: InputPlan) -> dict:
    return {"files": [asdict(f) for f in plan.found]}


def _differs(old: dict, new: InputFile) -> bool:
    """A recorded file whose size, fingerprint or rows are not what they were (a value either side lacks is not
    compared: a text file past `input.limit` was not counted)."""
    now = {"size": new.size, "fingerprint": new.fingerprint or None, "rows": new.rows}
    return any(old.get(k) not in (None, "") and v is not None and old[k] != v for k, v in now.items())


def input_changes(fs: AbstractFileSystem, root: str, plan: InputPlan) -> dict[str, list[str]]:
    """Files added, changed and removed since the manifest the output's last committing run recorded (none before
    its first); each kind present only when it has files. Changed and removed ones are logged as warnings."""
    previous = read_json(fs, join(root, INPUTS))
    if not isinstance(previous, dict):
        return {}
    before = {f["url"]: f for f in previous.get("files", []) if isinstance(f, dict) and "url" in f}
    now = {f.url: f for f in plan.found}
    found = {"added": [u for u in now if u not in before],
             "changed": [u for u in now if u in before and _differs(before[u], now[u])],
             "removed": [u for u in before if u not in now]}
    found = {k: v for k, v in found.items() if v}
    for kind, what in (("changed", "changed since the output drew from it (size, etag/mtime or rows differ)"),
                       ("removed", "no longer in the input")):
        if kind in found:
            names = ", ".join(redact_text(u) for u in found[kind][:SHOWN])
            more = f" and {len(found[kind]) - SHOWN} more" if len(found[kind]) > SHOWN else ""
            log.warning("input: %d file(s) %s: %s%s; their rows' images stay as drawn and are not redrawn (a new "
                        "output path draws them afresh)", len(found[kind]), what, names, more)
    if "added" in found:
        log.info("input: %d new file(s); their rows are drawn", len(found["added"]))
    return found


def record(fs: AbstractFileSystem, root: str, plan: InputPlan) -> None:
    write_json(fs, join(root, INPUTS), manifest(plan))
