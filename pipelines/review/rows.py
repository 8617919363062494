"""A run's rows as review and delivery see them: chosen metadata columns plus the input's kept columns, read by
column (never the judge features or a Parquet-format run's image bytes), as a `Run` that fetches images by key."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from promptmill.pipelines.layout import METADATA_SCHEMA
from promptmill.pipelines.metadata import metadata_files, read_metadata
from promptmill.pipelines.review.decisions import KEY
from promptmill.pipelines.runs.results import READ_COLUMNS, Run
from promptmill.pipelines.storage import filesystem

SHOWN = ["prompt", "clip_score", "aesthetic_score", "prompt_match", "near_duplicate", "nsfw", "width", "height", "sha256"]
PRODUCT_COLUMNS = ("product", "sku")  # the kept column that names the product, first found (schedules keep `sku`)


def kept_columns(schema: pa.Schema) -> list[str]:
    """The input's own columns a run carried into its metadata (input.keep_columns): every column not ours."""
    ours = set(METADATA_SCHEMA.names)
    return [c for c in schema.names if c not in ours]


def open_run(url: str, storage_options: dict | None = None,
             columns: list[str] | tuple[str, ...] = ()) -> tuple[Run, list[str]]:
    """(the run at `url` with READ_COLUMNS, SHOWN, `columns` and its kept columns read, the kept columns' names);
    FileNotFoundError if it holds no committed metadata."""
    fs, root = filesystem(url, storage_options)
    files = metadata_files(fs, root)[0]
    if not files:
        raise FileNotFoundError(f"{url!r} holds no committed metadata (metadata/*.parquet): not a finished run")
    with fs.open(files[0], "rb") as fh:
        kept = kept_columns(pq.read_schema(fh))
    wanted = list(dict.fromkeys([*KEY, *READ_COLUMNS, *SHOWN, *columns, *kept]))
    return Run(url, storage_options, metadata=read_metadata(fs, root, wanted), summary={}), kept


def product_column(kept: list[str], asked: str | None = None) -> str | None:
    """The column that groups images by product: `asked` (checked), else the first of PRODUCT_COLUMNS kept."""
    if asked:
        if asked not in kept:
            raise ValueError(f"product column {asked!r} is not a kept input column of the run (kept: {kept})")
        return asked
    return next((c for c in PRODUCT_COLUMNS if c in kept), None)
