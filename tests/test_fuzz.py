"""Property-based: random specs, random input tables and random `score` inputs through the real CLI. Every case
ends in a result or a one-line error (exit 2) that names the field, row or file: no traceback (exit 1 is the
CLI's last line of defence, an unexpected exception), nothing written outside the output, nothing lost from a
previous run. The default run is short; `make chaos` runs the long profile (PROMPTMILL_FUZZ_EXAMPLES)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from conftest import make_spec, write_prompts
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from promptmill.jobs.cli import main
from promptmill.pipelines.spec import reference

SCALE = int(os.environ.get("PROMPTMILL_FUZZ_EXAMPLES", "1"))  # make chaos: 20
FUZZ = {"deadline": None, "derandomize": True, "database": None,
        "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
TRIED = {"cases": 0, "tracebacks": 0}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(st.characters(codec="utf-8"), max_size=40), st.sampled_from(["", "..", "/", "~", "s3://",
                                                                                      "${NOPE}", "shipped:x"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(string.ascii_lowercase, max_size=8),
                                                                       inner, max_size=3)), max_leaves=6)
FIELDS = [path.replace("[*]", ".0") for path, *_ in reference()]


def _cli(args: list[str], capsys) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    TRIED["cases"] += 1
    TRIED["tracebacks"] += code not in (0, 2) or "Traceback" in err
    return code, err


def _one_line(code: int, err: str) -> None:
    assert code in (0, 2), err[-2000:]
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.startswith("promptmill: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err[-2000:]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@settings(**FUZZ, max_examples=120 * SCALE)
@given(edits=st.lists(st.tuples(st.sampled_from(FIELDS), values), min_size=1, max_size=3))

def test_random_specs_end_in_a_plan_or_one_line_naming_the_field(ray_local, checkpoints, tmp_path_factory, capsys,
                                                                  edits):
    tmp = tmp_path_factory.mktemp("spec")
    write_prompts(tmp / "in" / "a.parquet", ["a red circle"], ["a"])
    spec = make_spec(str(tmp / "in"), str(tmp / "out"), checkpoints)
    spec["scoring"] = {"enabled": False}
    for path, value in edits:
        node, keys = spec, path.split(".")
        for k in keys[:-1]:
            if isinstance(node, list):
                node = node[0] if node else {}
            elif isinstance(node, dict):
                node = node.setdefault(k, {}) if isinstance(node.get(k, {}), dict | list) else {}
        if isinstance(node, dict):
            node[keys[-1]] = value
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True))
    before = _files(tmp / "in")
    code, err = _cli(["generate", str(tmp / "spec.yaml"), "--dry-run"], capsys)
    _one_line(code, err)
    assert _files(tmp / "in") == before and not (tmp / "out").exists()  # a dry run writes nothing


def _column(kind: str, n: int, draw) -> pa.Array:
    text = st.text(st.characters(codec="utf-8"), max_size=30)
    if kind == "string":
        return pa.array(draw(st.lists(st.one_of(st.none(), text), min_size=n, max_size=n)), pa.string())
    if kind == "binary":  # bytes that may not be UTF-8
        return pa.array(draw(st.lists(st.one_of(st.none(), st.binary(max_size=20)), min_size=n, max_size=n)),
                        pa.binary())
    if kind == "int":
        return pa.array(draw(st.lists(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)), min_size=n, max_size=n)),
                        pa.int64())
    if kind == "float":
        return pa.array(draw(st.lists(st.floats(allow_nan=True), min_size=n, max_size=n)), pa.float64())
    if kind == "list":
        return pa.array(draw(st.lists(st.lists(text, max_size=2), min_size=n, max_size=n)), pa.list_(pa.string()))
    if kind == "null":
        return pa.nulls(n)
    return pa.array([{"a": i} for i in range(n)])  # struct


KINDS = ["string", "binary", "int", "float", "list", "null", "struct"]


@st.composite
def tables(draw) -> list[pa.Table | bytes]:
    """1-3 input files: tables with random column types, sizes and nulls, or bytes that are not Parquet."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        if draw(st.integers(0, 9)) == 0:
            out.append(draw(st.binary(max_size=64)))
            continue
        n = draw(st.integers(0, 12))
        cols = {name: _column(draw(st.sampled_from(KINDS)), n, draw) for name in ("id", "prompt")
                if draw(st.integers(0, 9)) > 0}
        out.append(pa.table(cols) if cols else pa.table({"other": pa.array(range(n))}))
    return out


@settings(**FUZZ, max_examples=10 * SCALE)
@given(files=tables())

def test_random_input_tables_are_validated_row_by_row_or_refused_naming_the_file(ray_local, checkpoints,
                                                                                  tmp_path_factory, capsys, files):
    tmp = tmp_path_factory.mktemp("input")
    (tmp / "in").mkdir()
    for i, f in enumerate(files):
        path = tmp / "in" / f"part-{i}.parquet"
        path.write_bytes(f) if isinstance(f, bytes) else pq.write_table(f, path)
    spec = make_spec(str(tmp / "in"), str(tmp / "out"), checkpoints)
    spec["scoring"] = {"enabled": False}
    (tmp / "spec.yaml").write_text(yaml.safe_dump(spec))
    code, err = _cli(["generate", str(tmp / "spec.yaml"), "--dry-run"], capsys)
    _one_line(code, err)
    if code == 2:
        assert "part-" in err or "id" in err or "prompt" in err, err  # names the file or the column
    assert not (tmp / "out").exists()


@settings(**FUZZ, max_examples=3 * SCALE)
@given(files=tables())

def test_random_score_inputs_score_or_refuse_and_keep_what_was_scored(ray_local, tmp_path_factory, capsys, files):
    tmp = tmp_path_factory.mktemp("score")
    (tmp / "in").mkdir()
    for i, f in enumerate(files):
        path = tmp / "in" / f"part-{i}.parquet"
        if isinstance(f, bytes):
            path.write_bytes(f)
        else:  # as `score` expects: an image column (here: whatever the table's id column is) and a caption
            t = f.rename_columns(["png" if c == "id" else "caption" if c == "prompt" else c for c in f.column_names])
            pq.write_table(t, path)
    previous = tmp / "out" / "kept.txt"
    previous.parent.mkdir()
    previous.write_text("a previous run's file")
    code, err = _cli(["score", str(tmp / "in"), "--out", str(tmp / "out"), "--actors", "1"], capsys)
    _one_line(code, err)
    assert previous.read_text() == "a previous run's file"


def test_fuzz_figure():
    """The figure README quotes ("bad inputs tried: N, tracebacks: 0"), printed with -s."""
    print(f"fuzz: bad inputs tried: {TRIED['cases']}, tracebacks: {TRIED['tracebacks']}")
    assert TRIED["tracebacks"] == 0
