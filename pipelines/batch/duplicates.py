"""Duplicate ids on Ray Data: the ids that occur more than once among the rows a run reads, counted by a hash-
partitioned aggregation over the id column alone (one task when they fit one partition), then handed to validation,
whose rule decides (a duplicated id rejects every copy). The driver holds neither the ids nor the duplicates: up to
BROADCAST_IDS duplicated ids travel to each validate task by object reference (the common case: few or none), more
are joined to the rows."""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from promptmill.pipelines.batch.aggregate import fetched_set, partitions, tally, together
from promptmill.pipelines.batch.validate import ID

BROADCAST_IDS = 1 << 20  # duplicated ids every validate task receives whole; beyond, a join (a shuffle of every row)
KEY, FLAG = "pm_dup_key", "pm_duplicated"

Validate = Callable[..., pa.Table]  # validate(batch, duplicates=<ids to reject as duplicate_id>)


def duplicated(ids: ray.data.Dataset, rows: int = 0) -> ray.data.Dataset:
    """The ids (column ID) that occur more than once in `ids` (about `rows` of them)."""
    if partitions(rows) == 1:
        return together(ids, _repeated_among)
    counts = ids.groupby(ID, num_partitions=partitions(rows)).count()
    return counts.map_batches(_repeated, batch_format="pyarrow")


def _repeated(t: pa.Table) -> pa.Table:
    return t.filter(pc.greater(t["count()"], 1)).select([ID])


def _repeated_among(*blocks: pa.Table) -> pa.Table:
    counts = tally(pa.concat_tables(blocks) if blocks else pa.table({ID: pa.array([], pa.string())}), ID)
    return pa.table({ID: counts["value"].filter(pc.greater(counts["n"], 1))})


def validate_with(rows: ray.data.Dataset, dups: ray.data.MaterializedDataset, validate: Validate,
                  key: Callable[[pa.Table], pa.Array], count: int) -> ray.data.Dataset:
    """`validate` over every row, each batch given the duplicated ids among its rows (or all of them). `key`: a
    batch's ids as text, as `dups` has them; `count`: the rows, to size a join."""
    if dups.count() <= BROADCAST_IDS:
        return rows.map_batches(_validate_broadcast, fn_kwargs={"validate": validate, "refs": dups.to_arrow_refs()},
                                batch_format="pyarrow")
    flagged = dups.map_batches(_flagged, batch_format="pyarrow")
    keyed = rows.map_batches(lambda t: t.append_column(KEY, key(t)), batch_format="pyarrow")
    joined = keyed.join(flagged, "left_outer", num_partitions=partitions(count), on=(KEY,))
    return joined.map_batches(_validate_joined, fn_kwargs={"validate": validate}, batch_format="pyarrow")


def _validate_broadcast(t: pa.Table, validate: Validate, refs: list) -> pa.Table:
    return validate(t, duplicates=fetched_set(refs, ID))


def _flagged(t: pa.Table) -> pa.Table:
    return pa.table({KEY: t[ID], FLAG: pa.array([True] * len(t), pa.bool_())})


def _validate_joined(t: pa.Table, validate: Validate) -> pa.Table:
    hit = pc.fill_null(t[FLAG], False)
    return validate(t.drop_columns([KEY, FLAG]), duplicates=set(t[KEY].filter(hit).to_pylist()))
