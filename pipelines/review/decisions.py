"""Review decisions: an append-only table inside the run (`reviews/part-*.parquet`), the latest per image wins.

Every decision (or a batch of them) is one new part with a unique name, put atomically: two reviewers writing at
once never touch each other's file, and nothing written is lost. `clear` undoes (the image is undecided again).
Auto rules (best N per product by a score, skipping flagged images) write decisions the same way, as `auto`.
"""

from __future__ import annotations

import datetime as dt
import threading
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec import AbstractFileSystem
from promptmill.pipelines.storage import join, parquet_bytes, put_atomic

REVIEWS = "reviews"
KEY = ["model", "id", "sample"]
DECISIONS = ("approve", "reject", "clear")
SCHEMA = pa.schema([("id", pa.string()), ("model", pa.string()), ("sample", pa.int32()), ("decision", pa.string()),
                    ("reason", pa.string()), ("reviewer", pa.string()), ("time", pa.timestamp("us", tz="UTC"))])
AUTO_REVIEWER = "auto"
FLAGS = ("near_duplicate", "nsfw")  # what an auto rule skips by default


def part_name(now: dt.datetime) -> str:
    """reviews/part-<UTC time>-<random>.parquet: names sort by time, and two writers in one microsecond differ."""
    return f"{REVIEWS}/part-{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:12]}.parquet"


def decision_table(keys: pa.Table, decision: str, reason: str | None, reviewer: str,
                   now: dt.datetime | None = None) -> pa.Table:
    """One decision for each (model, id, sample) row of `keys`; a bad decision or an empty reviewer is a ValueError."""
    if decision not in DECISIONS:
        raise ValueError(f"decision {decision!r}: not one of {list(DECISIONS)}")
    if not reviewer or not reviewer.strip():
        raise ValueError("reviewer: empty; every decision says who made it")
    now = now or dt.datetime.now(dt.UTC)
    n = len(keys)
    return pa.table({"id": keys["id"].cast(pa.string()), "model": keys["model"].cast(pa.string()),
                     "sample": keys["sample"].cast(pa.int32()), "decision": pa.array([decision] * n, pa.string()),
                     "reason": pa.array([reason or None] * n, pa.string()),
                     "reviewer": pa.array([reviewer.strip()] * n, pa.string()),
                     "time": pa.array([now] * n, SCHEMA.field("time").type)}, schema=SCHEMA)


def last_per_key(table: pa.Table, keys: list[str], order: list[tuple[str, str]]) -> pa.Table:
    """The last row of each `keys` group after a stable sort by keys then `order`: vectorised, no loop over rows."""
    t = table.sort_by([(k, "ascending") for k in keys] + order)
    n = len(t)
    if n < 2:
        return t
    same = None
    for k in keys:
        eq = pc.fill_null(pc.equal(t[k].slice(0, n - 1), t[k].slice(1)), False)
        both_null = pc.and_(pc.is_null(t[k].slice(0, n - 1)), pc.is_null(t[k].slice(1)))
        eq = pc.or_(eq, both_null)
        same = eq if same is None else pc.and_(same, eq)
    return t.filter(pa.chunked_array([*pc.invert(same).chunks, pa.array([True])]))


def latest(decisions: pa.Table) -> pa.Table:
    """The decision in force per image: the latest by time (ties: the later part), `clear`s dropped."""
    t = last_per_key(decisions, KEY, [("time", "ascending")])
    return t.filter(pc.not_equal(t["decision"], "clear"))


class DecisionLog:
    """The reviews of one run, read incrementally: parts are immutable, so each refresh lists the folder and reads
    only the parts it has not seen (a long review session keeps one GET per new part, not per part per request)."""

    def __init__(self, fs: AbstractFileSystem, root: str) -> None:
        self.fs, self.root, self.folder = fs, root, join(root, REVIEWS)
        self._parts: dict[str, pa.Table] = {}
        self._lock = threading.Lock()

    def refresh(self) -> pa.Table:
        """Every decision written so far, by anyone, in part-name (time) order."""
        with self._lock:
            names = sorted(f for f in (self.fs.find(self.folder) if self.fs.exists(self.folder) else [])
                           if f.rsplit("/", 1)[-1].startswith("part-") and f.endswith(".parquet"))
            for f in names:
                if f not in self._parts:
                    self._parts[f] = self._read(f)
            tables = [self._parts[f] for f in names]
        return pa.concat_tables(tables) if tables else SCHEMA.empty_table()

    def _read(self, path: str) -> pa.Table:
        try:
            t = pq.read_table(pa.BufferReader(self.fs.cat_file(path)))
            return t.select(SCHEMA.names).cast(SCHEMA)
        except (pa.ArrowInvalid, KeyError, ValueError) as e:
            raise ValueError(f"reviews part {path!r} is not a decisions table ({e})") from e

    def latest(self) -> pa.Table:
        return latest(self.refresh())

    def append(self, table: pa.Table) -> str:
        """Writes `table` (SCHEMA) as a new part, atomically, and returns its path."""
        if not len(table):
            return ""
        now = table["time"][0].as_py()
        path = join(self.root, part_name(now))
        put_atomic(self.fs, path, parquet_bytes(table.cast(SCHEMA)))
        with self._lock:
            self._parts[path] = table.cast(SCHEMA)
        return path

    def decide(self, keys: pa.Table, decision: str, reason: str | None, reviewer: str) -> pa.Table:
        table = decision_table(keys, decision, reason, reviewer)
        self.append(table)
        return table


def best_per_group(metadata: pa.Table, n: int, score: str, per: str | None, skip: tuple[str, ...] = FLAGS,
                   exclude: pa.Table | None = None) -> pa.Table:
    """(model, id, sample) of the best `n` images per `per` value by `score` (descending; ties by key), leaving out
    images with a null score, any `skip` flag true, or a key in `exclude` (e.g. images someone already rejected).
    Vectorised: a sort, then each row's rank within its group from the group boundaries."""
    if n < 1:
        raise ValueError(f"best: {n}; at least 1")
    for c in (score, *([per] if per else [])):
        if c not in metadata.column_names:
            raise ValueError(f"{c!r} is not a column of the run's metadata (columns: {metadata.column_names})")
    t = metadata.filter(pc.is_valid(metadata[score]))
    for flag in skip:
        if flag in t.column_names:
            t = t.filter(pc.invert(pc.fill_null(pc.cast(t[flag], pa.bool_()), False)))
    group = per or "model"
    t = t.select(list(dict.fromkeys([*KEY, group, score])))
    if exclude is not None and len(exclude):
        ex = exclude.select(KEY).cast(t.select(KEY).schema)
        t = t.join(ex.append_column("_x", pa.array([True] * len(ex))), KEY, join_type="left outer")
        t = t.filter(pc.is_null(t["_x"])).drop_columns(["_x"])
    t = t.sort_by([(group, "ascending"), (score, "descending"), *((k, "ascending") for k in KEY)])
    if not len(t):
        return t.select(KEY)
    g = pc.cast(t[group], pa.string()).to_numpy(zero_copy_only=False)
    start = np.ones(len(t), bool)
    start[1:] = g[1:] != g[:-1]
    idx = np.arange(len(t))
    rank = idx - np.maximum.accumulate(np.where(start, idx, 0))
    return t.filter(pa.array(rank < n)).select(KEY)
