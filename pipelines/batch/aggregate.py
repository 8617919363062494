"""Aggregations over Ray Data whose results are small (counts by a column), and the size of the hash shuffles the
job runs (duplicate ids, resume): what the driver gathers is one row per value per block, never the rows."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray.data

ROWS_PER_PARTITION = 2_000_000  # of a hash shuffle: ~100 MB of ids or keys per partition
MAX_PARTITIONS = 256


def partitions(rows: int) -> int:
    """Hash partitions for a shuffle over `rows` rows: each partition is joined or counted in memory at once."""
    return max(1, min(MAX_PARTITIONS, -(-rows // ROWS_PER_PARTITION)))


def _tally(t: pa.Table, column: str) -> pa.Table:
    counts = pc.value_counts(t[column]).flatten() if len(t) else [pa.array([], t[column].type), pa.array([], pa.int64())]
    return pa.table({"value": counts[0], "n": pc.cast(counts[1], pa.int64())})


def count_by(ds: ray.data.Dataset, column: str) -> dict:
    """Rows per value of `column` (None for nulls), counted in each block; the driver adds up one row per value per
    block."""
    out: dict = {}
    tallies = ds.map_batches(_tally, fn_kwargs={"column": column}, batch_format="pyarrow", batch_size=None)
    for t in tallies.iter_batches(batch_format="pyarrow", batch_size=None):
        for value, n in zip(t["value"].to_pylist(), t["n"].to_pylist()):
            out[value] = out.get(value, 0) + n
    return out
