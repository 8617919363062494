"""Resume on Ray Data: the sample keys an output already holds (committed metadata and staged parts), read as a
dataset and anti-joined with each model's samples (a hash-partitioned join), so neither the driver nor any task
holds every finished key; a resumed run draws exactly what is missing."""

from __future__ import annotations

import functools

import pyarrow as pa
import pyarrow.compute as pc
import ray.data
from fsspec import AbstractFileSystem
from promptmill.pipelines.batch.aggregate import count_by, partitions
from promptmill.pipelines.metadata import KEYS
from promptmill.pipelines.tables import ray_read_parquet


def finished_keys(fs: AbstractFileSystem, files: list[str]) -> ray.data.Dataset | None:
    """(model, id, sample) of every row of these metadata files (committed and staged, as listed); None for none."""
    return ray_read_parquet(files, fs, columns=KEYS) if files else None


def finished_per_model(finished: ray.data.Dataset | None) -> dict[str, int]:
    """Rows per model (a sample staged twice counts twice, as commit has not merged it yet)."""
    return {} if finished is None else {str(k): v for k, v in count_by(finished, "model").items()}


def _of_model(t: pa.Table, model: str) -> pa.Table:
    return t.filter(pc.equal(t["model"], model)).select(["id", "sample"])


def missing(samples: ray.data.Dataset, finished: ray.data.Dataset | None, model: str, rows: int) -> ray.data.Dataset:
    """`samples` (id, sample, ...) of `model` that `finished` does not hold; `rows`: about how many keys meet."""
    if finished is None:
        return samples
    done = finished.map_batches(functools.partial(_of_model, model=model), batch_format="pyarrow")
    return samples.join(done, "left_anti", num_partitions=partitions(rows), on=("id", "sample"))
