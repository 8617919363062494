"""The committed metadata table of a run: its parts listed afresh and read as one table, whatever layout version
wrote each part. Shared by the job (resume, commit) and by whatever reads a finished run back."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from promptmill.pipelines.layout import IMAGE_TYPE, METADATA, METADATA_SCHEMA, STAGING
from promptmill.pipelines.storage import join

KEYS = ["model", "id", "sample"]
# what the job's summary needs of the committed rows (`pipelines.runs.results.score_summary`), returned by commit
SUMMARY_COLUMNS = ["model", "id", "sample", "clip_score", "prompt_match", "candidates", "diversity", "near_duplicate",
                   "nsfw", "prompt_truncated", "aesthetic_score", "rerank_by"]


def _listing(fs: AbstractFileSystem, path: str) -> dict[str, int]:
    """Parquet files under `path` (sorted) with their sizes, from one listing."""
    if not fs.exists(path):
        return {}
    found = fs.find(path, detail=True)
    return {f: int(found[f].get("size") or 0) for f in sorted(found) if f.endswith(".parquet")}


def sized_metadata_files(fs: AbstractFileSystem, root: str) -> tuple[dict[str, int], dict[str, int]]:
    """(committed files, staging parts) with their sizes, listed afresh: workers wrote parts since this process
    last listed, and s3fs answers info() from its listing cache (a part missing there is FileNotFoundError)."""
    fs.invalidate_cache()  # all of it: s3fs drops only the path and its parents, not the folders below
    return _listing(fs, join(root, METADATA)), _listing(fs, join(root, STAGING, METADATA))


def metadata_files(fs: AbstractFileSystem, root: str) -> tuple[list[str], list[str]]:
    """(committed files, staging parts), listed afresh (`sized_metadata_files`)."""
    committed, staged = sized_metadata_files(fs, root)
    return list(committed), list(staged)


def read_part(fs: AbstractFileSystem, f: str, columns: list[str] | None = None) -> pa.Table:
    """A whole object (one GET, retried as one), not a stream cut mid-read by an outage; only `columns` (those
    the file has) are decoded."""
    buf = pa.BufferReader(fs.cat_file(f))
    if columns is not None:
        have = pq.read_schema(buf).names
        columns = [c for c in columns if c in have]
        buf.seek(0)
    return pq.read_table(buf, columns=columns)


def read_parts(fs: AbstractFileSystem, files: list[str], columns: list[str] | None = None) -> pa.Table:
    return union([read_part(fs, f, columns) for f in files], columns)


def union(tables: list[pa.Table], columns: list[str] | None = None) -> pa.Table:
    """Tables written at different times as one: our columns in layout order, then the extra ones (`columns`: those
    asked for, kept input columns included)."""
    schema = (pa.schema(list(METADATA_SCHEMA) + extra_fields(tables)) if columns is None
              else pa.schema([METADATA_SCHEMA.field(c) for c in columns if c in METADATA_SCHEMA.names]
                             + [f for f in extra_fields(tables) if f.name in columns]))
    return pa.concat_tables([conform(t, schema) for t in tables]) if tables else schema.empty_table()


def extra_fields(tables: list[pa.Table]) -> list[pa.Field]:
    """Columns beyond ours (input.keep_columns), in order of first appearance, each with its first non-null type."""
    found: dict[str, pa.DataType] = {}
    for t in tables:
        for f in t.schema:
            if f.name not in METADATA_SCHEMA.names and (f.name not in found or pa.types.is_null(found[f.name])):
                found[f.name] = f.type
    return [pa.field(k, v) for k, v in found.items()]


def _image(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """An older part's `image` (plain bytes) as the layout's Image struct (bytes, no path)."""
    if not (pa.types.is_binary(column.type) or pa.types.is_large_binary(column.type)):
        return column
    chunks = [pa.StructArray.from_arrays([c.cast(pa.binary()), pa.nulls(len(c), pa.string())], ["bytes", "path"],
                                         mask=c.is_null()) for c in column.chunks]
    return pa.chunked_array(chunks, IMAGE_TYPE)


def conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """`t` in `schema`'s columns and types; a column added to the layout later is null in older parts, and an older
    part's binary image becomes the Image struct."""
    cols = [(_image(t[f.name]) if f.name == "image" else t[f.name]) if f.name in t.column_names
            else pa.nulls(len(t), f.type) for f in schema]
    return pa.Table.from_arrays(cols, schema=pa.schema([f.with_type(c.type) for f, c in zip(schema, cols)])).cast(schema)


def sorted_by_key(table: pa.Table) -> pa.Table:
    return table.sort_by([("model", "ascending"), ("id", "ascending"), ("sample", "ascending")])


def read_metadata(fs: AbstractFileSystem, root: str, columns: list[str] | None = None) -> pa.Table:
    """The committed metadata of a run (what a user reads), sorted by model, id, sample; `columns` (with those
    three) or all."""
    return sorted_by_key(read_parts(fs, metadata_files(fs, root)[0], columns))
