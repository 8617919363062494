"""Commit: one metadata row per sample out of duplicated staging parts; half-written files are never read."""

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from promptmill.pipelines.batch.commit import commit, done_keys
from promptmill.pipelines.layout import METADATA_SCHEMA
from promptmill.pipelines.storage import parquet_bytes, put_atomic


def part(ids, samples, model="gan"):
    n = len(ids)
    cols = {f.name: [None] * n for f in METADATA_SCHEMA}
    cols.update(id=ids, sample=samples, model=[model] * n, prompt=[f"p {i}" for i in ids])
    return pa.table(cols, schema=METADATA_SCHEMA)


def test_duplicates_merge_to_one_row_and_tmp_files_are_ignored(tmp_path):
    fs = fsspec.filesystem("file")
    root = str(tmp_path)
    stage = f"{root}/_staging/metadata"
    put_atomic(fs, f"{stage}/a.parquet", parquet_bytes(part(["x", "y"], [0, 0])))
    put_atomic(fs, f"{stage}/b.parquet", parquet_bytes(part(["y", "z"], [0, 1])))  # y/0 again: a redone batch
    (tmp_path / "_staging" / "metadata" / "c.parquet.tmp").write_bytes(b"PAR1 cut off mid-write")
    assert done_keys(fs, root) == {"gan/x/0", "gan/y/0", "gan/z/1"}
    table = commit(fs, root)
    assert sorted(zip(table["id"].to_pylist(), table["sample"].to_pylist())) == [("x", 0), ("y", 0), ("z", 1)]
    on_disk = pq.read_table(tmp_path / "metadata")
    assert on_disk.num_rows == 3 and not list((tmp_path / "_staging" / "metadata").glob("*.parquet"))
    # a second commit with a new part merges with the committed rows, still one row per sample
    put_atomic(fs, f"{stage}/d.parquet", parquet_bytes(part(["x", "w"], [0, 0])))
    assert commit(fs, root).num_rows == 4
    assert pq.read_table(tmp_path / "metadata").num_rows == 4


def test_a_commit_with_nothing_staged_rewrites_only_duplicated_metadata(tmp_path):
    """Committed metadata that is one row per sample is left as it is (no new generation); committed files that
    hold a sample twice (a second writer's leftovers) are merged, the first file's row winning."""
    fs = fsspec.filesystem("file")
    root = str(tmp_path)
    put_atomic(fs, f"{root}/_staging/metadata/a.parquet", parquet_bytes(part(["x", "y"], [0, 0])))
    commit(fs, root)
    before = sorted(p.name for p in (tmp_path / "metadata").glob("*.parquet"))
    assert commit(fs, root).num_rows == 2
    assert sorted(p.name for p in (tmp_path / "metadata").glob("*.parquet")) == before
    put_atomic(fs, f"{root}/metadata/zz-leftover.parquet", parquet_bytes(part(["y"], [0], model="gan")))
    assert commit(fs, root).num_rows == 2
    after = sorted(p.name for p in (tmp_path / "metadata").glob("*.parquet"))
    assert after != before and "zz-leftover.parquet" not in after
    assert pq.read_table(tmp_path / "metadata").num_rows == 2


def test_diversity_and_near_duplicates_span_runs(tmp_path):
    """A prompt's samples committed in two runs are compared together: copies are near-duplicates with diversity
    0, distinct samples are not; one sample alone has neither."""
    import numpy as np

    fs = fsspec.filesystem("file")
    root = str(tmp_path)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=128).astype(np.float32), rng.normal(size=128).astype(np.float32)

    def with_features(t, feats):
        return t.set_column(t.schema.get_field_index("judge_features"), "judge_features",
                            pa.array([list(map(float, f)) for f in feats], pa.list_(pa.float32())))

    put_atomic(fs, f"{root}/_staging/metadata/1.parquet",
               parquet_bytes(with_features(part(["copy", "apart", "alone"], [0, 0, 0]), [a, a, b])))
    commit(fs, root, ("judge_features", 0.01))  # first run: one sample each, nothing to compare yet
    put_atomic(fs, f"{root}/_staging/metadata/2.parquet",  # the rerun draws each prompt's second sample
               parquet_bytes(with_features(part(["copy", "apart"], [1, 1]), [a * 1.0001, b])))
    rows = {(r["id"], r["sample"]): r for r in commit(fs, root, ("judge_features", 0.01)).to_pylist()}
    assert rows[("copy", 0)]["near_duplicate"] and rows[("copy", 1)]["near_duplicate"]
    assert rows[("copy", 0)]["diversity"] < 1e-6
    assert rows[("apart", 0)]["near_duplicate"] is False and rows[("apart", 0)]["diversity"] > 0.5
    assert rows[("alone", 0)]["diversity"] is None and rows[("alone", 0)]["near_duplicate"] is None
    from promptmill.pipelines.runs.results import score_summary

    s = score_summary(pq.read_table(tmp_path / "metadata"))["gan"]
    assert s["near_duplicate_rate"] == 0.5 and s["prompts_with_samples"] == 2


def test_bucketed_commit_equals_one_bucket(tmp_path, monkeypatch):
    """The merge holds one bucket at a time: split into many buckets it commits the same rows, diversity and
    keep_columns (null-typed in one part, strings in another) as in one, each prompt's samples in one file."""
    import shutil

    import numpy as np
    import promptmill.pipelines.batch.commit as c
    from promptmill.pipelines.metadata import read_metadata

    fs = fsspec.filesystem("file")
    rng = np.random.default_rng(1)
    ids = [f"p{i}" for i in range(40)]

    def staged(name, sample, extra):
        t = part(ids, [sample] * len(ids))
        t = t.set_column(t.schema.get_field_index("judge_features"), "judge_features",
                         pa.array([rng.normal(size=8).astype(np.float32).tolist() for _ in ids], pa.list_(pa.float32())))
        return t.append_column("sku", pa.array(extra, pa.string() if extra[0] is not None else pa.null()))

    one, many = tmp_path / "one", tmp_path / "many"
    put_atomic(fs, f"{one}/_staging/metadata/a.parquet", parquet_bytes(staged("a", 0, [None] * len(ids))))
    put_atomic(fs, f"{one}/_staging/metadata/b.parquet", parquet_bytes(staged("b", 1, [f"s{i}" for i in ids])))
    put_atomic(fs, f"{one}/_staging/metadata/c.parquet", parquet_bytes(staged("c", 1, ["again"] * len(ids))))  # redone
    shutil.copytree(one, many)
    commit(fs, str(one), ("judge_features", 0.5))
    monkeypatch.setattr(c, "BUCKET_BYTES", 1)  # as many buckets as bytes: every prompt's own file, or close
    summary = commit(fs, str(many), ("judge_features", 0.5))
    files = sorted((many / "metadata").glob("*.parquet"))
    assert len(files) > 10 and not list((many / "_staging" / "metadata").glob("*.parquet"))
    a, b = read_metadata(fs, str(one)), read_metadata(fs, str(many))
    assert a.num_rows == b.num_rows == 80 and a.equals(b)
    assert set(b["sku"].to_pylist()) == {None, *(f"s{i}" for i in ids)}  # the first copy of a sample wins
    assert b["diversity"].null_count == 0 and summary.num_rows == 80
    for f in files:  # a prompt's two samples are compared in one bucket
        t = pq.read_table(f)
        assert sorted(t["sample"].to_pylist()) == sorted([0, 1] * (t.num_rows // 2))
