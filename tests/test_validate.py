"""Row validation: every bad row gets its reason; seeds are stable and batch-independent."""

import pyarrow as pa
from promptmill.pipelines.batch.expand import expand_batch, image_seed
from promptmill.pipelines.batch.validate import ID, REASON, validate_batch
from promptmill.pipelines.spec import InputSpec


def test_reasons():
    t = pa.table({"id": ["a", "b", "c", "d", "e", "f", "../x", None, "g", "h"],
                  "prompt": ["ok", None, "", "   \t", "x" * 11, "dup", "fine", "fine", "ok too", "dup"]})
    spec = InputSpec(path="x", id_column="id", max_prompt_chars=10)
    out = validate_batch(t, spec, duplicates={"f", "h"})
    reasons = dict(zip(out[ID].to_pylist(), out[REASON].to_pylist()))
    assert reasons == {"a": None, "b": "null_prompt", "c": "empty_prompt", "d": "empty_prompt",
                       "e": "prompt_too_long", "f": "duplicate_id", "../x": "unsafe_id", None: "null_id",
                       "g": None, "h": "duplicate_id"}
    assert out.column("prompt").to_pylist() == t.column("prompt").to_pylist()  # original values kept


def test_binary_prompts_and_integer_ids():
    t = pa.table({"id": pa.array([1, 2], pa.int64()), "prompt": pa.array([b"a red circle", b"\xff\xfe"], pa.binary())})
    out = validate_batch(t, InputSpec(path="x", id_column="id"), set())
    assert out[ID].to_pylist() == ["1", "2"]
    assert out[REASON].to_pylist() == [None, "non_string_prompt"]


def test_expand_skips_done_and_seeds_are_stable():
    t = pa.table({ID: ["a", "b"], "prompt": ["p", "q"], REASON: [None, "empty_prompt"]})
    out = expand_batch(t, prompt_column="prompt", model="gan", images_per_prompt=3, job_seed=5, done=frozenset({"gan/a/1"}))
    assert out["sample"].to_pylist() == [0, 2]
    assert out["seed"].to_pylist() == [image_seed(5, "a", "gan", 0), image_seed(5, "a", "gan", 2)]
    assert image_seed(5, "a", "gan", 0) != image_seed(6, "a", "gan", 0) != image_seed(5, "a", "dalle", 0)
    # pinned: the seed of a sample must not change across machines or versions (blake2b of the key)
    assert image_seed(0, "a", "gan", 0) == 6787420138261917176


def test_blocklist_words_match_whole_words_and_patterns_search():
    t = pa.table({"id": ["a", "b", "c", "d", "e"],
                  "prompt": ["a Red Bull can", "a gunner", "a GUN", "FREE   money now", "a red circle"]})
    spec = InputSpec(path="x", id_column="id", blocklist={"words": ["gun", "red bull"], "patterns": [r"free\s+money"]})
    reasons = validate_batch(t, spec, set())[REASON].to_pylist()
    assert reasons == ["blocked", None, "blocked", "blocked", None]


def test_a_bad_blocklist_pattern_names_the_field():
    import pytest
    from promptmill.pipelines.spec import SpecError, load_spec

    with pytest.raises(SpecError, match=r"input.blocklist.patterns.*patterns\[1\]"):
        load_spec({"name": "x", "input": {"path": "p", "blocklist": {"patterns": ["ok", "(unclosed"]}},
                   "models": [{"name": "g", "family": "gan", "checkpoint": "c"}], "output": {"path": "o"}})
