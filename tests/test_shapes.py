"""The shapes domain: every caption form parses back to its scene, out-of-domain text gives None,
held-out pairs never reach the train split, renders are antialiased and deterministic."""

import itertools
import random

import numpy as np
import pytest
from promptmill.models.shapes.scenes import (
    BG_FORMS,
    HELD_OUT,
    POSITION_WORDS,
    PREFIXES,
    RELATION_WORDS,
    SIZE_WORDS,
    Obj,
    Scene,
    caption,
    example,
    matches,
    mismatches,
    parse,
    render,
)


def test_every_phrase_form_parses_back():
    o1, o2 = Obj("triangle", "orange", "small"), Obj("diamond", "purple", "large")
    forms = 0
    for prefix, bg in itertools.product(PREFIXES, [""] + BG_FORMS):
        for size in SIZE_WORDS["small"]:
            for pos, words in POSITION_WORDS.items():
                for w in words:
                    sep = " " if " " in w or w == "centered" else ", "
                    text = f"{prefix}a {size} orange triangle{sep}{w}" + bg.format(bg="gray")
                    p = parse(text)
                    assert p is not None, text
                    assert matches(p, Scene((o1,), "gray", pos)), text
                    forms += 1
            for rel, words in RELATION_WORDS.items():
                for w in words:
                    text = f"{prefix}an {size} orange triangle {w} a big purple diamond" + bg.format(bg="white")
                    text = text.replace("an small", "a small").replace("an little", "a little").replace("an tiny", "a tiny")
                    p = parse(text)
                    assert p is not None and matches(p, Scene((o1, o2), "white", None, rel)), text
                    forms += 1
    assert forms > 500


def test_generated_captions_round_trip():
    for split in ("train", "test", "full"):
        for i in range(2000):
            scene, text, _ = example(i, 3, split)
            assert matches(parse(text), scene), text


@pytest.mark.parametrize("text", ["a photo of a cat", "a red circle and a dog", "", "red", "circle circle",
                                  "a corgi wearing a red bowtie", "a small red circle on the left of", "a blue cube"])
def test_out_of_domain_is_none(text):
    assert parse(text) is None


def test_partial_prompts_constrain_only_what_they_state():
    p = parse("a red circle")
    assert matches(p, Scene((Obj("circle", "red", "large"),), "black", "top"))
    assert not matches(p, Scene((Obj("circle", "blue", "large"),), "black", "top"))
    # relations are compared in canonical form: "A right of B" is "B left of A"
    a, b = Obj("circle", "red", "small"), Obj("square", "blue", "large")
    assert matches(parse("a small red circle right of a large blue square"), Scene((b, a), "gray", None, "left of"))


def test_held_out_pairs():
    train = [example(i, 0, "train")[0] for i in range(3000)]
    test = [example(i, 0, "test")[0] for i in range(1000)]
    assert not any(s.held_out for s in train)
    assert 0.4 < np.mean([s.held_out for s in test]) < 0.6
    seen = {(o.color, o.shape) for s in train for o in s.objects}
    assert not seen & HELD_OUT
    assert {c for c, _ in HELD_OUT} <= {c for c, _ in seen} and {s for _, s in HELD_OUT} <= {s for _, s in seen}
    test_pairs = {(o.color, o.shape) for s in test for o in s.objects}
    assert HELD_OUT <= test_pairs


def test_render_is_deterministic_and_antialiased():
    scene = Scene((Obj("circle", "red", "large"),), "black", "center")
    a, b = render(scene), render(scene)
    assert a.shape == (32, 32, 3) and np.array_equal(a, b)
    reds = set(a[..., 0].ravel().tolist())
    assert len(reds) > 3  # edge pixels are blends, not just two colours
    assert tuple(a[16, 16]) == (230, 25, 25) and tuple(a[0, 0]) == (12, 12, 12)
    left = render(Scene((Obj("square", "blue", "small"),), "white", "left"))
    blue = (left[..., 2] > 200) & (left[..., 0] < 100)
    assert blue[:, :16].sum() > 10 and blue[:, 16:].sum() == 0


def test_captions_vary():
    scene = Scene((Obj("circle", "red", "large"),), "black", "center")
    rng = random.Random(0)
    assert len({caption(scene, rng) for _ in range(200)}) > 20


def test_hard_negatives_change_one_attribute_and_skip_other_text():
    import random

    from promptmill.models.shapes.scenes import caption, hard_negative, parse, sample_scene

    rng = random.Random(0)
    for _ in range(200):
        text = caption(sample_scene(rng), rng)
        neg = hard_negative(text, rng)
        assert neg is not None and neg != text
        assert len(neg.split()) == len(text.split())  # a word swapped, nothing added or dropped
        p, q = parse(text), parse(neg)
        if q is not None:
            assert p != q  # another scene, not a paraphrase
    assert hard_negative("a photo of a dog", rng) is None


def test_hard_negatives_swap_each_attribute_between_two_objects():
    """Binding negatives: same words, other scene, for colour, shape and size alike (a CLIP trained with colour
    swaps only could not tell which of two objects was the square, nor which was the big one)."""
    import random

    from promptmill.models.shapes.scenes import binding_swaps, hard_negatives

    text = "a small red circle left of a large blue square"
    negs = hard_negatives(text, random.Random(0))
    assert negs[1:] == ["a small blue circle left of a large red square", "a small red square left of a large blue circle",
                        "a large red circle left of a small blue square"]
    assert negs[0] not in negs[1:] and negs[0] != text
    assert binding_swaps("a big red circle left of a huge red circle") == {}  # the objects differ in nothing
    assert binding_swaps("a big red circle left of a small red circle") == {"size": "a small red circle left of a big red circle"}
    assert binding_swaps("a red circle on the left, on a black background") == {}  # one object: no pair


def test_attribute_errors_name_the_attribute_the_judge_reads_otherwise():
    from promptmill.pipelines.model_quality import attribute_errors

    red_circle, blue_square = Obj("circle", "red", "small"), Obj("square", "blue", "large")
    caps = ["a small red circle right of a large blue square",  # canonical: square left of circle
            "a small red circle right of a large blue square",
            "a small red circle right of a large blue square",
            "a red circle on the left"]
    scenes = [Scene((blue_square, red_circle), "gray", None, "left of"),  # right
              Scene((blue_square, Obj("diamond", "red", "small")), "gray", None, "left of"),  # second shape wrong
              Scene((red_circle,), "gray", "left"),  # one object where two were asked
              Scene((Obj("circle", "red", "large"),), "white", "right")]  # size unstated: only position counts
    errors = attribute_errors(caps, scenes)
    assert errors["two_objects"]["count"] == errors["two_objects"]["shape1"] == 0.3333  # rates over 3 prompts, 4 places
    assert errors["two_objects"]["shape0"] == 0 and errors["two_objects"]["relation"] == 0
    assert errors["one_object"] == {"count": 0, "position": 1.0, "color0": 0, "shape0": 0}
    assert mismatches(parse(caps[0]), scenes[0]) == []


@pytest.mark.parametrize("phrase,position", [("on the top", "top"), ("in the top", "top"), ("up top", "top"),
                                             ("at top", "top"), ("towards the bottom", "bottom"),
                                             ("in the centre", "center"), ("on the left-hand side", "left")])
def test_natural_variants_parse(phrase, position):
    p = parse(f"a small red square {phrase}")
    assert p is not None and p.position == position and p.objects[0] == {"shape": "square", "color": "red",
                                                                          "size": "small"}
    assert parse("a red circle underneath a blue square").relation == "below"


def test_captions_never_use_the_natural_variants():
    from promptmill.models.shapes.scenes import POSITION_VARIANTS

    variants = {v for vs in POSITION_VARIANTS.values() for v in vs}
    assert not any(v in example(i, 0, "train")[1] for i in range(3000) for v in variants if len(v) > 8)


def test_near_miss_rows_are_pure_functions_of_seed_and_index():
    from promptmill.models.shapes.near_miss import KINDS, near_miss

    a, b = near_miss(12, 0), near_miss(12, 0)
    assert a[0] == KINDS[12 % len(KINDS)] and a[2] == b[2] and (a[3] == b[3]).all()
    assert not (near_miss(12, 1)[3] == a[3]).all()
    assert parse(a[2]) is not None and matches(parse(a[2]), a[1])  # the caption states the intended scene


def test_template_coverage_is_the_mean_of_each_pixels_sub_samples_to_the_bit():
    from promptmill.models.shapes.geometry import _SS, _coverage

    rng = np.random.default_rng(0)
    for ph, pw in ((1, 1), (7, 13), (15, 17)):
        inside = rng.random((5, 3, 3, ph * _SS, pw * _SS)) < rng.random()
        want = inside.reshape(5, 3, 3, ph, _SS, pw, _SS).mean((-3, -1))
        got = _coverage(inside, ph, pw)
        assert got.dtype == want.dtype and np.array_equal(got, want)
