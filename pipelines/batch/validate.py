"""Validate rows: each gets a path-safe `pm_id` and a `pm_reason` (null = accepted).

Rejected rows keep their original values and go to the rejected table; the job goes on with the rest.
Reasons are checked in a fixed order, so a row always gets the same one.
"""

from __future__ import annotations

import re
from collections.abc import Set

import pyarrow as pa
from promptmill.pipelines.layout import SAFE_NAME
from promptmill.pipelines.spec import InputSpec, parse_size

ID, REASON = "pm_id", "pm_reason"
# what XML 1.0 (the images' XMP) cannot hold, and no prompt means: C0 controls but tab and newlines, DEL, C1, U+FFFE/F
CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffe\uffff]")


class InvalidUTF8(bytes):
    """A value of a *string* column whose bytes are not UTF-8 (Parquet does not check): a rejected row, not a
    crashed task (pyarrow's to_pylist raises on the whole column)."""


def column_values(column: pa.ChunkedArray) -> list:
    """Python values of a column; strings that are not valid UTF-8 come back as `InvalidUTF8` bytes."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return column.to_pylist()
    out = []
    for b in column.cast(pa.large_binary()).to_pylist():
        try:
            out.append(None if b is None else b.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(InvalidUTF8(b))
    return out


def id_texts(column: pa.ChunkedArray) -> list[str | InvalidUTF8 | None]:
    """A row id as text (`str` of an integer id), `InvalidUTF8` bytes or None: what validation and duplicate
    detection compare."""
    return [v if v is None or isinstance(v, InvalidUTF8) else str(v) for v in column_values(column)]


def reason_for(prompt: object, row_id: str | None, duplicates: Set[str], max_chars: int,
               blocked: re.Pattern | None = None) -> str | None:
    if row_id is None:
        return "null_id"
    if isinstance(row_id, InvalidUTF8):
        return "invalid_utf8"
    if not SAFE_NAME.fullmatch(row_id):
        return "unsafe_id"
    if row_id in duplicates:
        return "duplicate_id"
    if prompt is None:
        return "null_prompt"
    if isinstance(prompt, InvalidUTF8):
        return "invalid_utf8"
    if isinstance(prompt, bytes):
        try:
            prompt = prompt.decode("utf-8")
        except UnicodeDecodeError:
            return "non_string_prompt"
    if not isinstance(prompt, str):
        return "non_string_prompt"
    if not prompt.strip():
        return "empty_prompt"
    if CONTROL.search(prompt):
        return "control_characters"
    if len(prompt) > max_chars:
        return "prompt_too_long"
    if blocked is not None and blocked.search(prompt):
        return "blocked"
    return None


def row_controls_reason(negative: object, size: object, max_chars: int, presets: frozenset[str]) -> str | None:
    """A per-row negative prompt or size that no model can take (`input.negative_prompt_column`, `size_column`)."""
    if negative is not None and (not isinstance(negative, str) or len(negative) > max_chars or CONTROL.search(negative)):
        return "bad_negative_prompt"
    if size is not None and not (isinstance(size, str) and (size in presets or parse_size(size) is not None)):
        return "bad_size"
    return None


def validate_batch(table: pa.Table, spec: InputSpec, duplicates: Set[str], presets: frozenset[str] = frozenset()
                   ) -> pa.Table:
    if spec.id_column is None:
        ids = [f"r{h:016x}" for h in table.column("row_hash").to_pylist()]
        table = table.drop_columns(["row_hash"])
    else:
        ids = id_texts(table.column(spec.id_column))
    prompts = column_values(table.column(spec.prompt_column))
    blocked = spec.blocklist.compiled()
    reasons = [reason_for(p, i, duplicates, spec.max_prompt_chars, blocked) for p, i in zip(prompts, ids)]
    if spec.negative_prompt_column or spec.size_column:  # `presets`: size names every model defines
        n = len(prompts)
        negatives = column_values(table.column(spec.negative_prompt_column)) if spec.negative_prompt_column else [None] * n
        sizes = column_values(table.column(spec.size_column)) if spec.size_column else [None] * n
        reasons = [r or row_controls_reason(neg, size, spec.max_prompt_chars, presets)
                   for r, neg, size in zip(reasons, negatives, sizes)]
    ids = [None if isinstance(i, InvalidUTF8) else i for i in ids]  # such a row is rejected; its original id stays
    return table.append_column(ID, pa.array(ids, pa.string())).append_column(REASON, pa.array(reasons, pa.string()))


def prompt_text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
