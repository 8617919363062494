"""Score any image-caption table with the job's scoring stage: `promptmill score INPUT --out OUT`.

The same actors (`ScoreStage`) add the same columns (clip_score, judged, geometry, prompt_match) to every input
row; `score_error` says why a row has none (an image that does not decode). Exactly once and resumable per input
file: each file becomes one output part named after it, written whole in one atomic put; a rerun scores only the
files without a part, and `_SUCCESS` + `summary.json` come when every file has one. `_score.json` records what
was asked (input, columns, scorers), so a rerun with other settings is refused instead of mixing two scorings;
the job's lease keeps two runs from writing one output at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from promptmill.models.images import decode_image
from promptmill.pipelines.batch.lease import Lease
from promptmill.pipelines.batch.pools import map_in_pool
from promptmill.pipelines.batch.preflight import check_scoring
from promptmill.pipelines.batch.score import ScoreStage
from promptmill.pipelines.batch.sizing import scoring_pool_size
from promptmill.pipelines.layout import LEASE, SUCCESS, SUMMARY
from promptmill.pipelines.ray_cluster import ensure_ray, local_cores
from promptmill.pipelines.redaction import redact
from promptmill.pipelines.spec import ScoringSpec
from promptmill.pipelines.storage import filesystem, full_url, join, parquet_bytes, put_atomic
from promptmill.pipelines.tables import InputError, list_files, ray_read_parquet

log = logging.getLogger(__name__)

SETTINGS = "_score.json"
SCORE_COLUMNS = ("clip_score", "judged", "geometry", "prompt_match", "score_error")
PATH = "__source"  # the input file a row came from (Ray Data's include_paths column, renamed)


def part_name(path: str) -> str:
    """One output part per input file: its stem, plus a hash of its full path (two folders may hold a.parquet)."""
    stem = path.rsplit("/", 1)[-1].removesuffix(".parquet")
    return f"{stem}-{hashlib.blake2b(path.encode(), digest_size=4).hexdigest()}.parquet"


class ScoreRows(ScoreStage):
    """Decodes the image column and scores it (a dataset may mix sizes: the stage scores one size at a time)."""

    def __init__(self, scoring: ScoringSpec, image_column: str, caption_column: str, threads: int | None = None) -> None:
        super().__init__(scoring, threads=threads)
        self.image_column, self.caption_column = image_column, caption_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch[self.image_column])
        out = {k: np.full(n, None, object) for k in SCORE_COLUMNS}
        decoded: dict[int, np.ndarray] = {}
        for i, data in enumerate(batch[self.image_column]):
            try:
                # `datasets`' Image struct (a Parquet output of ours, or any HF dataset) or plain bytes
                decoded[i] = decode_image(bytes(data["bytes"] if isinstance(data, dict) else data))
            except Exception as e:  # noqa: BLE001 - any undecodable bytes: this row's error, not the job's
                out["score_error"][i] = f"image does not decode: {type(e).__name__}: {e}"[:300]
        idx = sorted(decoded)
        if idx:
            captions = ["" if c is None else str(c) for c in batch[self.caption_column]]
            scored = super().__call__({"pixels": [decoded[i] for i in idx],
                                       "prompt": np.array([captions[i] for i in idx], object)})
            for k in SCORE_COLUMNS[:-1]:
                out[k][idx] = scored[k]
            out["score_error"][idx] = scored["scoring_error"]  # a row the scorers raised on, alone
        batch.update(out)
        return batch


def _settings(input_url: str, image_column: str, caption_column: str, scoring: ScoringSpec) -> dict:
    return redact({"input": input_url, "image_column": image_column, "caption_column": caption_column,
                   "clip": scoring.clip, "judge": scoring.judge})


def score_table(input_url: str, out_url: str, image_column: str = "png", caption_column: str = "caption",
                scoring: ScoringSpec | None = None, input_storage_options: dict | None = None,
                output_storage_options: dict | None = None) -> dict:
    """Score every row of every Parquet file under `input_url` into `out_url`; returns the summary."""
    scoring = scoring or ScoringSpec()
    fs_in, files = list_files(input_url, input_storage_options or {})
    schema = pq.read_schema(fs_in.open(files[0], "rb"))
    for col in (image_column, caption_column):
        if col not in schema.names:
            raise InputError(f"{full_url(fs_in, files[0])}: no column {col!r} (columns: {schema.names}); "
                             "name yours with --image-column / --caption-column")
    clash = sorted(set(schema.names) & set(SCORE_COLUMNS))
    if clash:
        raise InputError(f"{full_url(fs_in, files[0])}: already has score columns {clash}; drop them to rescore")
    check_scoring(scoring, where="--")
    fs, root = filesystem(out_url, output_storage_options)
    settings = _settings(input_url, image_column, caption_column, scoring)
    parts_dir = join(root, "parts")
    with Lease(fs, root, job="score").acquire():
        previous = json.loads(fs.cat_file(join(root, SETTINGS))) if fs.exists(join(root, SETTINGS)) else None
        if previous is None and fs.exists(root) and fs.ls(root, detail=False):
            others = [p for p in fs.ls(root, detail=False) if not p.endswith(LEASE)]
            if others:
                raise InputError(f"--out {out_url!r} holds files that promptmill score did not write "
                                 f"({others[0].rsplit('/', 1)[-1]}, ...): use an empty directory")
        if previous is not None and previous != settings:
            changed = sorted(k for k in settings if settings[k] != previous.get(k))
            raise InputError(f"--out {out_url!r} was scored with other settings ({', '.join(changed)}): use a new "
                             "output, or the same settings to finish it")
        if previous is None:
            put_atomic(fs, join(root, SETTINGS), json.dumps(settings, sort_keys=True).encode())
        done = {p.rsplit("/", 1)[-1] for p in fs.ls(parts_dir, detail=False)} if fs.exists(parts_dir) else set()
        pending = [f for f in files if part_name(full_url(fs_in, f)) not in done]
        t0 = time.time()
        if pending:
            _score_files(fs_in, pending, fs, parts_dir, image_column, caption_column, scoring)
        summary = _summary(fs, parts_dir, len(files), len(files) - len(pending), time.time() - t0)
        put_atomic(fs, join(root, SUMMARY), json.dumps(summary, indent=2).encode())
        put_atomic(fs, join(root, SUCCESS), b"")
    return summary


def _score_files(fs_in, files: list[str], fs_out, parts_dir: str, image_column: str, caption_column: str,
                 scoring: ScoringSpec) -> None:
    r = scoring.resources
    ensure_ray(r.actors * r.num_cpus + 2)
    expected = {full_url(fs_in, f): pq.ParquetFile(fs_in.open(f, "rb")).metadata.num_rows for f in files}
    size = scoring_pool_size(scoring, r.actors, local_cores(), sum(expected.values()))
    ds = ray_read_parquet(files, fs_in, include_paths=True)
    ds = map_in_pool(ds, ScoreRows, {"scoring": scoring, "image_column": image_column,
                                     "caption_column": caption_column, "threads": size.threads},
                     size)
    held: dict[str, list[pa.Table]] = defaultdict(list)
    count: dict[str, int] = defaultdict(int)
    by_path = {p.split("://", 1)[-1]: p for p in expected}  # Ray reports paths without the scheme
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        for path in set(batch.column("path").to_pylist()):
            rows = batch.filter(pa.compute.equal(batch.column("path"), path)).drop_columns(["path"])
            url = by_path.get(path.split("://", 1)[-1], path)
            held[url].append(rows)
            count[url] += rows.num_rows
            if count[url] == expected[url]:  # the whole file: one atomic put, then forget it
                table = pa.concat_tables(held.pop(url), promote_options="default")
                put_atomic(fs_out, join(parts_dir, part_name(url)), parquet_bytes(table))
                log.info("scored %s (%d rows)", redact(url), table.num_rows)


def _summary(fs, parts_dir: str, files: int, skipped: int, wall_s: float) -> dict:
    rows = errors = matched = judged = 0
    for p in fs.ls(parts_dir, detail=False) if fs.exists(parts_dir) else []:
        with fs.open(p, "rb") as fh:
            t = pq.read_table(fh, columns=["prompt_match", "score_error"])
        rows += t.num_rows
        errors += t.num_rows - t.column("score_error").null_count
        match = [m for m in t.column("prompt_match").to_pylist() if m is not None]
        judged += len(match)
        matched += sum(match)
    return {"files": files, "files_skipped_as_done": skipped, "rows": rows, "scored": rows - errors,
            "score_errors": errors, "prompt_match": round(matched / judged, 4) if judged else None,
            "prompt_match_n": judged, "wall_s": round(wall_s, 1)}
