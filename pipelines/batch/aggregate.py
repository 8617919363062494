"""Aggregations over Ray Data whose results are small (counts by a column), and the size of the hash shuffles the
job runs (duplicate ids, resume): what the driver gathers is one row per value per block, never the rows. A shuffle
that would have one partition runs as one task instead (`together`): the shuffle's actors cost every small job
seconds of start-up."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

ROWS_PER_PARTITION = 2_000_000  # of a hash shuffle: ~100 MB of ids or keys per partition
MAX_PARTITIONS = 256


def partitions(rows: int) -> int:
    """Hash partitions for a shuffle over `rows` rows: each partition is joined or counted in memory at once."""
    return max(1, min(MAX_PARTITIONS, -(-rows // ROWS_PER_PARTITION)))


def together(ds: ray.data.Dataset, fn: Callable[..., pa.Table], *args) -> ray.data.MaterializedDataset:
    """`fn(*args, *blocks)` over every block of `ds` at once, in one task (for data of one partition): the driver
    holds the blocks' references, never their rows."""
    return ray.data.from_arrow_refs([_together.remote(fn, args, *ds.to_arrow_refs())])


@ray.remote
def _together(fn: Callable[..., pa.Table], args: tuple, *blocks: pa.Table) -> pa.Table:
    return fn(*args, *blocks)


FETCHED_SETS = 3  # per worker process: the duplicate ids, and the finished keys of models whose batches interleave
_FETCHED: dict[tuple[str, ...], frozenset] = {}  # least recently used first


def fetched_set(refs: list, column: str) -> frozenset:
    """The values of `column` in the tables behind `refs` (object references handed to every task of a map), as
    a set built once per worker process (the FETCHED_SETS last used are kept)."""
    names = (column, *(r.hex() for r in refs))
    if names in _FETCHED:
        _FETCHED[names] = _FETCHED.pop(names)
    else:
        while len(_FETCHED) >= FETCHED_SETS:
            _FETCHED.pop(next(iter(_FETCHED)))
        _FETCHED[names] = frozenset(v for t in (ray.get(refs) if refs else []) for v in t.column(column).to_pylist())
    return _FETCHED[names]


def tally(t: pa.Table, column: str) -> pa.Table:
    """Rows per value of `column` in `t` (columns value, n); an empty table has none."""
    counts = pc.value_counts(t[column]).flatten() if len(t) else [pa.array([], t[column].type), pa.array([], pa.int64())]
    return pa.table({"value": counts[0], "n": pc.cast(counts[1], pa.int64())})


def count_by(ds: ray.data.Dataset, column: str) -> dict:
    """Rows per value of `column` (None for nulls), counted in each block; the driver adds up one row per value per
    block."""
    out: dict = {}
    tallies = ds.map_batches(tally, fn_kwargs={"column": column}, batch_format="pyarrow", batch_size=None)
    for t in tallies.iter_batches(batch_format="pyarrow", batch_size=None):
        for value, n in zip(t["value"].to_pylist(), t["n"].to_pylist()):
            out[value] = out.get(value, 0) + n
    return out
