"""Spec loading: errors name the field path and bad value; --set overrides are typed; secrets redacted."""

from pathlib import Path

import pytest
from promptmill.pipelines.redaction import redact
from promptmill.pipelines.spec import SpecError, load_spec

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


def test_a_spec_files_relative_paths_resolve_against_its_folder_and_set_values_against_the_cwd(tmp_path, monkeypatch):
    import yaml
    from promptmill.pipelines.ops.schedule import load_schedule
    from promptmill.pipelines.spec import SHIPPED

    (tmp_path / "jobs").mkdir()
    spec = {**BASE, "models": [{"name": "gan", "family": "gan", "checkpoint": "../ck"},
                               {"name": "shipped", "family": "gan", "checkpoint": "shipped:gan"},
                               {"name": "s3", "family": "gan", "checkpoint": "s3://b/ck/"}],
            "scoring": {"judge": "~/judge", "clip": "${CLIP_URL}"}, "metrics": {"reference": "ref"}}
    (tmp_path / "jobs/spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir("/")
    monkeypatch.setenv("CLIP_URL", "s3://b/clip")
    s = load_spec(tmp_path / "jobs/spec.yaml", ["output.path=typed/here"])
    assert s.input.path == str(tmp_path / "jobs/in") and s.metrics.reference == str(tmp_path / "jobs/ref")
    assert s.models[0].checkpoint == str(tmp_path / "ck") and s.models[2].checkpoint == "s3://b/ck/"
    assert s.models[1].checkpoint == str(SHIPPED / "gan") and (SHIPPED / "gan/config.json").is_file()
    assert s.output.path == "typed/here"  # --set is the shell's: relative to where the command runs
    assert s.scoring.judge == "~/judge" and s.scoring.clip == "s3://b/clip"
    assert load_spec(dict(BASE)).input.path == "in/"  # a dict has no folder: paths as given
    with pytest.raises(SpecError, match=r"models\[0\]\.checkpoint.*no shipped checkpoint 'gann'; shipped: \['clip'"):
        load_spec(dict(BASE), ["models.0.checkpoint=shipped:gann"])
    sched = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples/schedule.yaml").read_text())
    (tmp_path / "jobs/schedule.yaml").write_text(yaml.safe_dump(sched))
    s = load_schedule(str(tmp_path / "jobs/schedule.yaml"))
    assert s.catalog.path == str(tmp_path / "jobs/catalog.parquet") and s.output.prefix == str(tmp_path / "runs/creatives")


def test_redact_hides_secrets_only():
    out = redact({"storage_options": {"key": "AKIA", "secret": "s", "endpoint_url": "http://x"},
                  "models": [{"token": "t", "name": "gan"}], "aws_session_token": None})
    assert out["storage_options"] == {"key": "***", "secret": "***", "endpoint_url": "http://x"}
    assert out["models"] == [{"token": "***", "name": "gan"}]


def test_spec_reference_is_generated_from_the_code_and_docs_are_in_sync():
    from promptmill.pipelines.spec import JobSpec, reference, reference_markdown

    paths = {r[0]: r for r in reference()}
    assert {"output.format", "models[*].resources.batch_size", "scoring.resources.num_gpus"} <= set(paths)
    assert paths["output.format"][1] == "'files' | 'webdataset' | 'parquet'"
    assert paths["models[*].resources.batch_size"][3] == JobSpec.model_fields["models"].annotation.__args__[0] \
        .model_fields["resources"].annotation.model_fields["batch_size"].description
    docs = (Path(__file__).resolve().parents[1] / "docs" / "spec.md").read_text()
    assert docs == reference_markdown(), "docs/spec.md is stale: run `make spec-docs`"


@pytest.mark.parametrize("name", ["demo", "sd-turbo", "amused-256", "sdxl"])
def test_the_example_specs_are_valid(name):
    """What README points users at loads as it is (fields, presets, LoRAs, per-row columns)."""
    spec = load_spec(str(Path(__file__).resolve().parents[1] / "examples" / f"{name}.yaml"))
    if name == "sdxl":
        m = spec.models[0]
        assert m.sizes["16:9"] == "1344x768" and m.loras[0].weight == 0.8 and spec.input.size_column == "placement"
