"""What the review page shows: the run's rows filtered, sorted and paged with pyarrow.compute, decisions joined.

The metadata is read once, by column (`rows.open_run`); each request filters and sorts it with Arrow kernels and
converts only the page's rows to Python: no loop over the run's rows per request (`benchmarks/review_deliver.py`).
"""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from threading import Lock

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from promptmill.pipelines.review.decisions import KEY, DecisionLog
from promptmill.pipelines.review.rows import open_run, product_column
from promptmill.pipelines.runs.report import thumbnail_image

log = logging.getLogger(__name__)
SCORES = ("clip_score", "aesthetic_score")
FLAG_COLUMNS = ("near_duplicate", "nsfw", "prompt_match")
MAX_FACETS = 200  # a kept column with more distinct values than this is filtered by typed text, not a list
MAX_PAGE = 500
THUMB_SMALL, THUMB_BOX = 192, 256


@dataclass
class Query:
    """One page request; every field comes from the query string and is checked here (a bad one names itself)."""

    equals: dict[str, str] = field(default_factory=dict)  # model or a kept column -> value
    prompt: str | None = None  # substring, case-insensitive
    flags: dict[str, bool] = field(default_factory=dict)
    decision: str | None = None  # approve | reject | none
    score: str = "clip_score"
    min_score: float | None = None
    max_score: float | None = None
    sort: str = "key"  # key | score_desc | score_asc
    offset: int = 0
    limit: int = 60


class Grid:
    """A run opened for review: its rows (kept in memory, by column), its decisions, thumbnails on demand."""

    def __init__(self, url: str, storage_options: dict | None = None, product: str | None = None,
                 thumb_cache: int = 4096) -> None:
        self.run, self.kept = open_run(url, storage_options)
        self.table = self.run.metadata
        self.product = product_column(self.kept, product)
        self.log = DecisionLog(self.run.fs, self.run.root)
        self.scores = [c for c in SCORES if c in self.table.column_names and self.table[c].null_count < len(self.table)]
        self._thumbs: OrderedDict[tuple, bytes] = OrderedDict()
        self._thumb_cache, self._lock = thumb_cache, Lock()
        self.facets = {c: self._facet(c) for c in ["model", *self.kept]}
        self._keys = self.table.select(KEY).append_column("_in", pa.array(np.ones(len(self.table), bool)))

    def _facet(self, column: str) -> list[str] | None:
        values = pc.unique(pc.cast(self.table[column], pa.string()))
        if len(values) > MAX_FACETS:
            return None
        return sorted(v for v in values.to_pylist() if v is not None)

    # ------------------------------------------------------------ queries

    def parse(self, params: Mapping[str, str]) -> Query:
        """A Query from the page's query string; ValueError naming the parameter."""
        q = Query()
        for c in ["model", *self.kept]:
            if params.get(c):
                q.equals[c] = params[c]
        q.prompt = params.get("prompt") or None
        for f in FLAG_COLUMNS:
            v = params.get(f)
            if v:
                if v not in ("true", "false"):
                    raise ValueError(f"{f}: {v!r}; true or false")
                q.flags[f] = v == "true"
        q.decision = params.get("decision") or None
        if q.decision not in (None, "approve", "reject", "none"):
            raise ValueError(f"decision: {q.decision!r}; approve, reject or none")
        q.score = params.get("score") or (self.scores[0] if self.scores else "clip_score")
        if q.score not in SCORES:
            raise ValueError(f"score: {q.score!r}; one of {list(SCORES)}")
        for name in ("min_score", "max_score"):
            if params.get(name):
                try:
                    setattr(q, name, float(params[name]))
                except ValueError:
                    raise ValueError(f"{name}: {params[name]!r} is not a number") from None
        q.sort = params.get("sort") or "key"
        if q.sort not in ("key", "score_desc", "score_asc"):
            raise ValueError(f"sort: {q.sort!r}; key, score_desc or score_asc")
        for name, hi in (("offset", 1 << 40), ("limit", MAX_PAGE)):
            if params.get(name):
                try:
                    v = int(params[name])
                except ValueError:
                    raise ValueError(f"{name}: {params[name]!r} is not an integer") from None
                if not 0 <= v <= hi:
                    raise ValueError(f"{name}: {v} outside 0..{hi}")
                setattr(q, name, v)
        return q

    def _mask(self, t: pa.Table, q: Query) -> pa.ChunkedArray | None:
        masks = []
        for c, v in q.equals.items():
            masks.append(pc.equal(pc.cast(t[c], pa.string()), v))
        if q.prompt:
            masks.append(pc.match_substring(t["prompt"], q.prompt, ignore_case=True))
        for f, v in q.flags.items():
            if f in t.column_names:
                masks.append(pc.equal(pc.fill_null(pc.cast(t[f], pa.bool_()), False), v))
        if q.score in t.column_names:
            if q.min_score is not None:
                masks.append(pc.greater_equal(t[q.score], q.min_score))
            if q.max_score is not None:
                masks.append(pc.less_equal(t[q.score], q.max_score))
        if not masks:
            return None
        m = masks[0]
        for x in masks[1:]:
            m = pc.and_(m, x)
        return pc.fill_null(m, False)

    def query(self, q: Query) -> dict:
        """{total, offset, rows}: the page's rows as dicts, each with its latest decision (or None)."""
        t = self.table
        mask = self._mask(t, q)
        if mask is not None:
            t = t.filter(mask)
        decided = self.log.latest()
        if q.decision:  # the keys joined with the decisions, then the matching rows taken in their order
            narrow = t.select(KEY).append_column("_i", pa.array(np.arange(len(t))))
            j = narrow.join(decided.select([*KEY, "decision"]), KEY, join_type="left outer")
            hit = pc.is_null(j["decision"]) if q.decision == "none" else \
                pc.fill_null(pc.equal(j["decision"], q.decision), False)
            t = t.take(np.sort(j.filter(hit)["_i"].to_numpy()))
        if q.sort != "key" and q.score in t.column_names:
            order = [(q.score, "descending" if q.sort == "score_desc" else "ascending"), *((k, "ascending") for k in KEY)]
            t = t.sort_by(order)  # nulls last (Arrow's default)
        page = t.slice(q.offset, q.limit)
        return {"total": len(t), "offset": q.offset, "rows": self._rows(page, decided)}

    def _rows(self, page: pa.Table, decided: pa.Table) -> list[dict]:
        keys = list(zip(*(page[k].to_pylist() for k in KEY)))
        wanted = decided.filter(pc.is_in(decided["id"], pa.array(sorted({k[1] for k in keys}), pa.string()))) \
            if len(keys) else decided.slice(0, 0)
        by_key = {(d["model"], d["id"], d["sample"]): d for d in wanted.to_pylist()}
        out = []
        shown = ["prompt", *self.scores, *(f for f in FLAG_COLUMNS if f in page.column_names), "width", "height"]
        cols = {c: page[c].to_pylist() for c in [*shown, *self.kept]}
        for i, (m, rid, s) in enumerate(keys):
            d = by_key.get((m, rid, s))
            out.append({"model": m, "id": rid, "sample": s, **{c: cols[c][i] for c in shown},
                        "kept": {c: _plain(cols[c][i]) for c in self.kept},
                        "decision": None if d is None else {"decision": d["decision"], "reason": d["reason"],
                                                            "reviewer": d["reviewer"], "time": d["time"].isoformat()}})
        return out

    # ------------------------------------------------------------ keys and images

    def keys(self, items: list[dict]) -> pa.Table:
        """(model, id, sample) of `items`: a ValueError for a malformed item, a KeyError naming the first key that is
        no image of this run."""
        try:
            want = pa.table({"model": pa.array([str(i["model"]) for i in items], pa.string()),
                             "id": pa.array([str(i["id"]) for i in items], pa.string()),
                             "sample": pa.array([int(i["sample"]) for i in items], pa.int32())})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"items: each needs model, id and sample ({e})") from None
        found = want.join(self._keys, KEY, join_type="left outer")
        missing = found.filter(pc.is_null(found["_in"]))
        if len(missing):
            m = missing.slice(0, 1).to_pylist()[0]
            raise KeyError(f"no image {m['model']}/{m['id']}/{m['sample']} in this run")
        return want

    def row(self, model: str, row_id: str, sample: int) -> pa.Table:
        """The metadata row of one image (empty when the run has none): a filter, never a path from the request."""
        t = self.table
        return t.filter(pc.and_(pc.and_(pc.equal(t["model"], model), pc.equal(t["id"], row_id)),
                                pc.equal(t["sample"], sample)))

    def thumbnail(self, model: str, row_id: str, sample: int) -> bytes | None:
        """A PNG thumbnail of one image of the run, cached (images of a run never change); None if no such image."""
        key = (model, row_id, sample)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        row = self.row(model, row_id, sample)
        if not len(row):
            return None
        try:
            img = self.run.images(row)[0]
        except (ValueError, FileNotFoundError, KeyError) as e:  # a path outside the run (metadata is anyone's to
            # edit), or an image file or tar member gone: not served
            log.warning("%s", e)
            return None
        im = thumbnail_image(img, THUMB_SMALL, THUMB_BOX)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data = buf.getvalue()
        with self._lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self._thumb_cache:
                self._thumbs.popitem(last=False)
        return data


def _plain(v):
    return v if v is None or isinstance(v, str | int | float | bool) else str(v)
