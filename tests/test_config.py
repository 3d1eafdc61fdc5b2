"""Config: profiles load, `--set` overrides reach nested fields, and mistakes fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import ROOT
from medtune import config as config_mod
from medtune.config import ConfigError, DataConfig, PreprocessConfig


@pytest.mark.parametrize("profile", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_profile_loads(profile):
    cfg = config_mod.load(profile)
    assert cfg.data.path and cfg.preprocess.test_fraction + cfg.preprocess.val_fraction < 1


def test_set_overrides_nested_data_fields():
    cfg = config_mod.load(ROOT / "configs" / "local.yaml", [
        "data.phi.phone=mask", "data.columns.input=question", "data.allowed_values.qtype=[symptoms, treatment]",
        "data.max_answer_tokens=512", "preprocess.conflicting_duplicates=keep", "data.hf_revision=null"])
    assert (cfg.data.phi.phone, cfg.data.phi.ssn) == ("mask", "block")  # unset kinds keep their default
    assert cfg.data.columns == {"input": "question"}
    assert cfg.data.allowed_values == {"qtype": ["symptoms", "treatment"]}
    assert cfg.data.max_answer_tokens == 512 and cfg.data.hf_revision is None
    assert cfg.preprocess.conflicting_duplicates == "keep"


@pytest.mark.parametrize("override, message", [
    ("data.colums.input=question", "data.colums: Extra inputs are not permitted"),
    ("data.columns.input=questoin", "data.columns.input: Input should be 'id', 'question'"),
    ("data.phi.phone=hide", "data.phi.phone: Input should be 'block', 'mask' or 'off'"),
    ("data.min_kept_fraction=1.5", "data.min_kept_fraction: Input should be less than or equal to 1"),
    ("data.min_answer_chars=100", "min_answer_chars=100 is above max_answer_chars"),
    ("data.format=xml", "data.format: Input should be 'auto'"),
    ("preprocess.test_fraction=0.6", "preprocess.test_fraction: Input should be less than 0.5"),
    ("preprocess.conflicting_duplicates=merge", "preprocess.conflicting_duplicates: Input should be 'drop' or 'keep'"),
    ("decoding.repetition_penalty=0.9", "decoding.repetition_penalty: Input should be greater than or equal to 1"),
])
def test_bad_values_name_the_field(override, message):
    extra = ["data.max_answer_chars=50"] if "min_answer_chars" in override else []
    with pytest.raises(ConfigError) as err:
        config_mod.load(ROOT / "configs" / "local.yaml", [override, *extra])
    assert message in str(err.value) and "local.yaml" in str(err.value)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config_mod.load(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML"):
        config_mod.load(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="--set expects key=value"):
        config_mod.load(ROOT / "configs" / "local.yaml", ["data.path"])


def test_data_defaults_are_safe():
    data = DataConfig(path="x.jsonl")
    assert {getattr(data.phi, k) for k in ("email", "phone", "ssn", "mrn", "dob")} == {"block"}
    assert data.max_question_tokens is None and data.max_bad_line_fraction == 0.5
    assert PreprocessConfig().conflicting_duplicates == "drop"


def test_digest_changes_with_data_contract():
    base = config_mod.load(ROOT / "configs" / "local.yaml")
    changed = config_mod.load(ROOT / "configs" / "local.yaml", ["data.phi.email=mask"])
    assert base.digest() != changed.digest() and base.digest() == config_mod.from_json(base.to_json()).digest()


def test_profiles_resolve_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert config_mod.find_profile("local") == config_mod.PROFILES / "local.yaml"
    assert config_mod.find_profile("configs/local.yaml") == config_mod.PROFILES / "local.yaml"
    assert config_mod.load("qwen2.5-0.5b-qlora").name == "qwen2.5-0.5b-qlora"
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    assert config_mod.find_profile("mine.yaml") == Path("mine.yaml")  # a path here wins over the bundled names
    with pytest.raises(config_mod.ConfigError, match=r"nosuch: config file not found \(nor a bundled profile: local"):
        config_mod.find_profile("nosuch")


def test_data_validate_runs_outside_the_checkout(tmp_path):
    """The default profile is found by name and FILE is relative to where the command runs."""
    import subprocess
    import sys

    (tmp_path / "qa.jsonl").write_text('{"question": "What helps a gout flare?", "answer": "Rest and ice."}\n')
    medtune = Path(sys.executable).parent / "medtune"
    done = subprocess.run([str(medtune), "data", "validate", "qa.jsonl"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "rows read 1, kept 1, quarantined 0" in done.stdout
    assert (tmp_path / "medtune-validation" / "validation.json").exists()
