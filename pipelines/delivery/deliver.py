"""`promptmill deliver`: the approved images of a run, fitted to every placement, encoded with provenance, and a
manifest (`manifest.parquet` + `manifest.csv`) listing each delivered file.

Idempotent: the manifest says what was delivered from which source image with which settings; a file already
there with the same (image, placement, size, fit, format, source sha256) is not written again, and the manifest is
rewritten only when it changes. An image no longer approved is withdrawn: its files are deleted and its rows left
out. Files are `<DEST>/<placement>/<model>/<id>-<sample>.<ext>`, each put atomically.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from promptmill.pipelines.delivery.placements import FITS, Placement, fit_image
from promptmill.pipelines.layout import IMAGE_FORMATS, SAFE_NAME, encode_image, extension
from promptmill.pipelines.provenance import FIELDS
from promptmill.pipelines.review.decisions import KEY, DecisionLog
from promptmill.pipelines.review.rows import open_run
from promptmill.pipelines.runs.results import Run
from promptmill.pipelines.storage import filesystem, full_url, join, parquet_bytes, put_atomic

log = logging.getLogger(__name__)
MANIFEST_PARQUET, MANIFEST_CSV = "manifest.parquet", "manifest.csv"
SOURCE = [*FIELDS, "sha256", "clip_score", "aesthetic_score"]  # what each delivered row needs from the run
SCORES = ("clip_score", "aesthetic_score")
CHUNK = 32  # images fetched and fitted together: one concurrent fetch, then a thread per image


@dataclass(frozen=True)
class DeliverSettings:
    placements: tuple[Placement, ...]
    fit: str = "crop"
    image_format: str = "jpeg"
    pad: tuple[int, int, int] | None = None  # None: each image's border colour
    workers: int = 4

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"fit {self.fit!r}: one of {list(FITS)}")
        if self.image_format not in IMAGE_FORMATS:
            raise ValueError(f"format {self.image_format!r}: one of {list(IMAGE_FORMATS)}")


@dataclass
class Delivery:
    """What one `deliver` did, for the log and the tests."""

    approved: int = 0
    written: dict[str, int] = field(default_factory=dict)  # placement -> files written now
    kept: int = 0  # files already delivered with the same settings
    withdrawn: int = 0  # files deleted: their image is no longer approved
    manifest: str = ""
    manifest_written: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"approved": self.approved, "written": self.written, "already_delivered": self.kept,
                "withdrawn": self.withdrawn, "manifest": self.manifest, "manifest_written": self.manifest_written}


def approved_rows(run: Run, latest: pa.Table) -> pa.Table:
    """The run's rows whose decision in force is approve, with approved_by / approved_at, sorted by key."""
    ok = latest.filter(pc.equal(latest["decision"], "approve"))
    ok = ok.select([*KEY, "reviewer", "time"]).rename_columns([*KEY, "approved_by", "approved_at"])
    return run.metadata.join(ok, KEY, join_type="inner").sort_by([(k, "ascending") for k in KEY])


def relpath(p: Placement, model: str, row_id: str, sample: int, image_format: str) -> str:
    return f"{p.name}/{model}/{row_id}-{sample}.{extension(image_format)}"


def own_file(entry: dict) -> bool:
    """Whether a manifest row's path is one `deliver` writes (the manifest is anyone's to edit: a path such as
    ../../x is never deleted)."""
    names = (entry.get("placement"), entry.get("model"), entry.get("id"))
    if not all(isinstance(n, str) and SAFE_NAME.fullmatch(n) for n in names) or entry.get("format") not in IMAGE_FORMATS:
        return False
    p = Placement(entry["placement"], 0, 0)
    return entry.get("path") == relpath(p, entry["model"], entry["id"], int(entry["sample"]), entry["format"])


def provenance(row: dict, p: Placement) -> dict[str, str]:
    """The provenance fields embedded in a delivered file: the run's own (prompt, model, checkpoint, seed, ...)."""
    return {**{k: str(row[k]) for k in FIELDS if row.get(k) is not None}, "placement": p.name}


def manifest_schema(run: Run, kept: list[str]) -> pa.Schema:
    md = run.metadata.schema
    return pa.schema([md.field("id"), *(md.field(c) for c in kept), md.field("model"), md.field("sample"),
                      ("placement", pa.string()), ("path", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
                      ("format", pa.string()), ("fit", pa.string()), ("sha256", pa.string()),
                      ("source_sha256", pa.string()), ("prompt", pa.string()),
                      *(md.field(s) for s in SCORES if s in md.names), ("approved_by", pa.string()),
                      ("approved_at", pa.timestamp("us", tz="UTC"))])


def read_manifest(fs, root: str) -> pa.Table | None:
    path = join(root, MANIFEST_PARQUET)
    if not fs.exists(path):
        return None
    try:
        return pq.read_table(pa.BufferReader(fs.cat_file(path)))
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path}: not a delivery manifest ({e}); move it away to deliver afresh") from e


def _same(old: dict, row: dict, p: Placement, s: DeliverSettings) -> bool:
    return (old["width"], old["height"], old["fit"], old["format"], old["source_sha256"]) == \
        (p.width, p.height, s.fit, s.image_format, row.get("sha256"))


def deliver(src: str, dest: str, settings: DeliverSettings, storage_options: dict | None = None,
            dest_options: dict | None = None) -> Delivery:
    """Delivers the approved images of the run at `src` to `dest` (any fsspec URL) in every placement."""
    # 1. What is approved, and what the destination already holds
    run, kept = open_run(src, storage_options, SOURCE)
    rows = approved_rows(run, DecisionLog(run.fs, run.root).latest())
    fs, root = filesystem(dest, storage_options if dest_options is None else dest_options)
    old = read_manifest(fs, root)
    old_rows = {(r["model"], r["id"], r["sample"], r["placement"]): r for r in (old.to_pylist() if old else [])}
    present = set(fs.find(root)) if fs.exists(root) else set()
    out = Delivery(approved=len(rows), written={p.name: 0 for p in settings.placements})

    # 2. Plan: per approved image, the placements whose file is missing or was made otherwise
    entries: dict[tuple, dict] = {}
    todo: list[tuple[int, list[Placement]]] = []
    pylist = rows.to_pylist()
    for i, r in enumerate(pylist):
        need = []
        for p in settings.placements:
            k = (r["model"], r["id"], r["sample"], p.name)
            o = old_rows.get(k)
            if o is not None and _same(o, r, p, settings) and join(root, o["path"]) in present:
                entries[k] = _entry(r, kept, p, settings, o["sha256"])
                out.kept += 1
            else:
                need.append(p)
        if need:
            todo.append((i, need))

    # 3. Fit, encode and put what is missing, a chunk of images at a time
    def one(r: dict, img, need: list[Placement]) -> list[dict]:
        made = []
        for p in need:
            data = encode_image(fit_image(img, p, settings.fit, settings.pad), settings.image_format, provenance(r, p))
            put_atomic(fs, join(root, relpath(p, r["model"], r["id"], r["sample"], settings.image_format)), data)
            made.append(_entry(r, kept, p, settings, hashlib.sha256(data).hexdigest()))
        return made

    with ThreadPoolExecutor(settings.workers) as pool:
        for c in range(0, len(todo), CHUNK):
            chunk = todo[c:c + CHUNK]
            imgs = run.images(rows.take([i for i, _ in chunk]))
            for made in pool.map(lambda a: one(pylist[a[0][0]], a[1], a[0][1]), zip(chunk, imgs)):
                for e in made:
                    entries[(e["model"], e["id"], e["sample"], e["placement"])] = e
                    out.written[e["placement"]] += 1

    # 4. Withdraw what is no longer approved, then the manifest (only when it changed)
    approved_keys = {(r["model"], r["id"], r["sample"]) for r in pylist}
    for k, o in old_rows.items():
        if k[:3] not in approved_keys and own_file(o) and join(root, o["path"]) in present:
            fs.rm(join(root, o["path"]))
            out.withdrawn += 1
    schema = manifest_schema(run, kept)
    table = pa.Table.from_pylist([entries[k] for k in sorted(entries)], schema=schema)
    out.manifest = full_url(fs, join(root, MANIFEST_PARQUET))
    if old is None or not old.equals(table):
        put_atomic(fs, join(root, MANIFEST_PARQUET), parquet_bytes(table))
        buf = io.BytesIO()
        pacsv.write_csv(table, buf)
        put_atomic(fs, join(root, MANIFEST_CSV), buf.getvalue())
        out.manifest_written = True
    log.info("delivered %s", out.as_dict())
    return out


def _entry(r: dict, kept: list[str], p: Placement, s: DeliverSettings, sha256: str) -> dict:
    at = r["approved_at"]
    return {"id": r["id"], **{c: r.get(c) for c in kept}, "model": r["model"], "sample": r["sample"],
            "placement": p.name, "path": relpath(p, r["model"], r["id"], r["sample"], s.image_format),
            "width": p.width, "height": p.height, "format": s.image_format, "fit": s.fit, "sha256": sha256,
            "source_sha256": r.get("sha256"), "prompt": r["prompt"], **{k: r.get(k) for k in SCORES},
            "approved_by": r["approved_by"], "approved_at": at if at is None or at.tzinfo else at.replace(tzinfo=dt.UTC)}
