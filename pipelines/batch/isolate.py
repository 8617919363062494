"""Poison rows do not sink a batch: retry once, then split the batch down to the rows that still fail.

One prompt that makes a model raise (a tokenizer edge case, a NaN, an OOM on one size) killed the whole job.
`run_isolated` calls the stage on the whole batch, once more on failure, then on halves, recursively; a single
row gets two tries. Pixels do not depend on the batch (every family is batch-invariant), so splitting changes
nothing for the rows that succeed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


def error_text(e: BaseException) -> str:
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= 500 else text[:500] + "..."


def run_isolated(call: Callable[[list[int]], T], idx: list[int], tries: int = 2
                 ) -> tuple[list[tuple[list[int], T]], dict[int, str]]:
    """(successful (indices, result) chunks, {index: error text} of the rows that fail on their own)."""
    err: BaseException | None = None
    for _ in range(tries):
        try:
            return [(idx, call(idx))], {}
        except Exception as e:  # noqa: BLE001 - any model error is this batch's, not the job's
            err = e
    if len(idx) == 1:
        log.warning("row %d failed twice: %s", idx[0], error_text(err))
        return [], {idx[0]: error_text(err)}
    mid = len(idx) // 2
    done_a, bad_a = run_isolated(call, idx[:mid], tries=1 if mid > 1 else 2)
    done_b, bad_b = run_isolated(call, idx[mid:], tries=1 if len(idx) - mid > 1 else 2)
    return done_a + done_b, {**bad_a, **bad_b}
