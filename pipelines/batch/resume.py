"""Resume on Ray Data: the sample keys an output already holds (committed metadata and staged parts), read as a
dataset and anti-joined with each model's samples (a hash-partitioned join), so neither the driver nor any task
holds every finished key; a resumed run draws exactly what is missing. Keys of one partition are gathered in one
task and handed to every expand task by reference instead (no shuffle actors to start)."""

from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from fsspec import AbstractFileSystem
from promptmill.pipelines.batch.aggregate import count_by, fetched_set, partitions, together
from promptmill.pipelines.metadata import KEYS
from promptmill.pipelines.tables import ray_read_parquet


def finished_keys(fs: AbstractFileSystem, files: list[str]) -> ray.data.Dataset | None:
    """(model, id, sample) of every row of these metadata files (committed and staged, as listed); None for none."""
    return ray_read_parquet(files, fs, columns=KEYS) if files else None


def finished_per_model(finished: ray.data.Dataset | None) -> dict[str, int]:
    """Rows per model (a sample staged twice counts twice, as commit has not merged it yet)."""
    return {} if finished is None else {str(k): v for k, v in count_by(finished, "model").items()}


KEY = "pm_sample_key"


def _of_model(t: pa.Table, model: str) -> pa.Table:
    return t.filter(pc.equal(t["model"], model)).select(["id", "sample"])


def _sample_keys(t: pa.Table) -> pa.Array:
    """One text per (id, sample); ids never hold control characters (validation rejects them)."""
    return pc.binary_join_element_wise(pc.cast(t["id"], pa.string()), pc.cast(t["sample"], pa.string()), "\x1f")


def _keys_of_model(model: str, *blocks: pa.Table) -> pa.Table:
    return pa.table({KEY: pa.concat_arrays([_sample_keys(_of_model(b, model)).combine_chunks() for b in blocks]
                                           or [pa.array([], pa.string())])})


def _unfinished(t: pa.Table, refs: list) -> pa.Table:
    done = fetched_set(refs, KEY)
    return t.filter(pa.array([k not in done for k in _sample_keys(t).to_pylist()], pa.bool_()))


def missing(samples: ray.data.Dataset, finished: ray.data.Dataset | None, model: str, rows: int) -> ray.data.Dataset:
    """`samples` (id, sample, ...) of `model` that `finished` does not hold; `rows`: about how many keys meet. A
    join runs here, to its end (materialized), before any actor pool starts: streamed beside the pools, Ray 2.54's
    resource budget left its tasks no CPU and the job waited forever."""
    if finished is None:
        return samples
    if partitions(max(rows, finished.count())) == 1:
        keys = together(finished, _keys_of_model, model).to_arrow_refs()
        return samples.map_batches(_unfinished, fn_kwargs={"refs": keys}, batch_format="pyarrow")
    done = finished.map_batches(functools.partial(_of_model, model=model), batch_format="pyarrow")
    return samples.join(done, "left_anti", num_partitions=partitions(rows), on=("id", "sample")).materialize()
