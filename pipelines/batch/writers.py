"""One writer per output layout (img2dataset's split): each stores a batch's encoded images its own way and fills
the rows' image columns; `WriteStage` does what every layout shares (rejected rows, encoding, the metadata part).

- `files`: one object per image at a deterministic name, and with `sidecars` img2dataset's `<key>.txt` / `.json`.
- `webdataset`: one tar per model per write batch (`<key>.png`, `<key>.txt` prompt, `<key>.json` metadata), staged
  under `_staging/shards/`; `pipelines.batch.commit` numbers them `shards/<model>/{shard:05d}.tar`.
- `parquet`: the encoded image rides in the metadata table itself (`image`, as `datasets`' Image: bytes and name).
`image_path` is relative to the output's root (`layout.PATHS`).
"""

from __future__ import annotations

import json
import uuid

import pyarrow as pa
from promptmill.pipelines.layout import (
    METADATA_SCHEMA,
    SHARDS,
    STAGING,
    extension,
    image_relpath,
    sample_member_key,
    tar_bytes,
)
from promptmill.pipelines.storage import Location, is_local_fs, join, put_atomic


def sample_json(row: dict) -> bytes:
    return json.dumps({k: v for k, v in row.items() if k not in ("image", "image_path")}, sort_keys=True,
                      default=str).encode()


def _with(table: pa.Table, name: str, values: list) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, pa.array(values, METADATA_SCHEMA.field(name).type))


class LayoutWriter:
    """Stores a batch's images (`encoded`, in the rows' order) in one layout; returns the rows with their image
    columns set. Called before the batch's metadata part is staged: a row never names an image not yet written."""

    def __init__(self, out: Location, image_format: str) -> None:
        self.out, self.image_format = out, image_format

    def store(self, table: pa.Table, encoded: list[bytes]) -> pa.Table:
        raise NotImplementedError


class FilesWriter(LayoutWriter):
    def __init__(self, out: Location, image_format: str, sidecars: bool = False) -> None:
        super().__init__(out, image_format)
        self.sidecars = sidecars

    def store(self, table: pa.Table, encoded: list[bytes]) -> pa.Table:
        fs = self.out.fs
        paths = [self.out.path(image_relpath(m, i, int(s), self.image_format))
                 for m, i, s in zip(*(table[c].to_pylist() for c in ("model", "id", "sample")))]
        if is_local_fs(fs):
            for d in {p.rsplit("/", 1)[0] for p in paths}:
                fs.makedirs(d, exist_ok=True)
        fs.pipe(dict(zip(paths, encoded)))  # s3fs: concurrent PUTs
        table = _with(table, "image_path", [p[len(self.out.root.rstrip("/")) + 1:] for p in paths])
        if self.sidecars:  # beside the image, after it
            side = {}
            for path, row in zip(paths, table.to_pylist()):
                stem = path.rsplit(".", 1)[0]
                side[f"{stem}.txt"], side[f"{stem}.json"] = row["prompt"].encode(), sample_json(row)
            fs.pipe(side)
        return table


class ParquetWriter(LayoutWriter):
    def store(self, table: pa.Table, encoded: list[bytes]) -> pa.Table:
        names = [f"{i}-{int(s)}.{extension(self.image_format)}" for i, s in zip(table["id"].to_pylist(),
                                                                             table["sample"].to_pylist())]
        return _with(table, "image", [{"bytes": b, "path": n} for b, n in zip(encoded, names)])


class WebDatasetWriter(LayoutWriter):
    def store(self, table: pa.Table, encoded: list[bytes]) -> pa.Table:
        """One staged tar per model in the batch; rows get its path."""
        table = _with(table, "image_key", [sample_member_key(str(i), int(s))
                                           for i, s in zip(table["id"].to_pylist(), table["sample"].to_pylist())])
        ext = extension(self.image_format)
        rows = table.to_pylist()
        paths = [None] * len(rows)
        for model in sorted({r["model"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["model"] == model]
            members = []
            for i in idx:
                key = rows[i]["image_key"]
                members += [(f"{key}.{ext}", encoded[i]), (f"{key}.txt", rows[i]["prompt"].encode()),
                            (f"{key}.json", sample_json(rows[i]))]
            rel = join(STAGING, SHARDS, model, f"{uuid.uuid4().hex}.tar")
            put_atomic(self.out.fs, self.out.path(rel), tar_bytes(members))
            for i in idx:
                paths[i] = rel
        return _with(table, "image_path", paths)


WRITERS: dict[str, type[LayoutWriter]] = {"files": FilesWriter, "parquet": ParquetWriter, "webdataset": WebDatasetWriter}


def layout_writer(fmt: str, out: Location, image_format: str, sidecars: bool = False) -> LayoutWriter:
    """The writer of `output.format`; `sidecars` is the files layout's."""
    if fmt not in WRITERS:
        raise ValueError(f"format must be one of {sorted(WRITERS)}, got {fmt!r}")
    return FilesWriter(out, image_format, sidecars) if fmt == "files" else WRITERS[fmt](out, image_format)
