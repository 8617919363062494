"""Spec loading: errors name the field path and bad value; --set overrides are typed; secrets redacted."""

from pathlib import Path

import pytest

from pipelines.spec import SpecError, load_spec, redact

BASE = {"name": "t", "input": {"path": "in/"}, "output": {"path": "out/"},
        "models": [{"name": "gan", "family": "gan", "checkpoint": "ck/"}]}


def test_defaults_and_typed_overrides():
    spec = load_spec(dict(BASE), ["models.0.images_per_prompt=4", "seed=7", "input.limit=null",
                                  "models.0.sampling={truncation: 0.8}", "output.image_format=webp"])
    assert spec.models[0].images_per_prompt == 4 and spec.seed == 7
    assert spec.models[0].sampling == {"truncation": 0.8}
    assert spec.output.image_format == "webp"
    assert spec.models[0].resources.batch_size == 32


@pytest.mark.parametrize("override, needle", [
    (["models.0.family=diffusion"], "models[0].family"),
    (["models.0.resources.batch_size=0"], "models[0].resources.batch_size"),
    (["input.colour=red"], "input.colour"),
    (["models.0.name=../evil"], "models[0].name"),
    (["models.0.resources.max_actors=0"], "models[0].resources.max_actors"),
])
def test_errors_name_field_and_value(override, needle):
    with pytest.raises(SpecError) as e:
        load_spec(dict(BASE, models=[dict(BASE["models"][0])]), override)
    assert needle in str(e.value)
    assert repr(override[0].split("=", 1)[1]) in str(e.value) or override[0].split("=", 1)[1] in str(e.value)


def test_duplicate_model_names_rejected():
    with pytest.raises(SpecError, match="repeated: \\['gan'\\]"):
        load_spec(dict(BASE, models=[BASE["models"][0], BASE["models"][0]]))


def test_bad_set_syntax_and_yaml(tmp_path):
    with pytest.raises(SpecError, match="key=value"):
        load_spec(dict(BASE), ["seed"])
    p = tmp_path / "s.yaml"
    p.write_text("- a list\n")
    with pytest.raises(SpecError, match="mapping"):
        load_spec(p)


def test_redact_hides_secrets_only():
    out = redact({"storage_options": {"key": "AKIA", "secret": "s", "endpoint_url": "http://x"},
                  "models": [{"token": "t", "name": "gan"}], "aws_session_token": None})
    assert out["storage_options"] == {"key": "***", "secret": "***", "endpoint_url": "http://x"}
    assert out["models"] == [{"token": "***", "name": "gan"}]


def test_spec_reference_is_generated_from_the_code_and_docs_are_in_sync():
    from pipelines.spec import JobSpec, reference, reference_markdown

    paths = {r[0]: r for r in reference()}
    assert {"output.format", "models[*].resources.batch_size", "scoring.resources.num_gpus"} <= set(paths)
    assert paths["output.format"][1] == "'files' | 'webdataset' | 'parquet'"
    assert paths["models[*].resources.batch_size"][3] == JobSpec.model_fields["models"].annotation.__args__[0] \
        .model_fields["resources"].annotation.model_fields["batch_size"].description
    docs = (Path(__file__).resolve().parents[1] / "docs" / "spec.md").read_text()
    assert docs == reference_markdown(), "docs/spec.md is stale: run `make spec-docs`"
