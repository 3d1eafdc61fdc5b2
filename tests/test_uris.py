"""Credentials never travel in the URIs medtune shows or records, and a run cannot redirect the Secrets."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import ROOT
from medtune import config as config_mod
from medtune import pins, uris

PASSWORD = "s3cret-pw-4f1a"


@pytest.mark.parametrize("uri, shown", [
    (f"http://ana:{PASSWORD}@mlflow.example:5000", "http://mlflow.example:5000"),
    (f"https://ana%40corp:{PASSWORD}@mlflow.example/path?x=1#top", "https://mlflow.example/path?x=1#top"),
    (f"https://mlflow.example/?token={PASSWORD}&flag&run=4", "https://mlflow.example/?token=***&flag&run=4"),
    (f"s3://bucket/key?X-Amz-Signature={PASSWORD}", "s3://bucket/key?X-Amz-Signature=***"),
    ("sqlite:///tmp/mlflow.db", "sqlite:///tmp/mlflow.db"),
    ("file:///data/a@b/c", "file:///data/a@b/c"),  # an @ in a path is not a login
    ("/abs/path", "/abs/path"),
    (None, None),
])
def test_redact(uri, shown):
    assert uris.redact(uri) == shown


def test_credentials_are_split_off_decoded():
    assert uris.credentials(f"https://ana%40corp:{PASSWORD}@h:5000/p") == ("https://h:5000/p", "ana@corp", PASSWORD)
    assert uris.credentials("http://h:5000") == ("http://h:5000", None, None)


def test_tracking_credentials_move_to_the_variables_mlflow_reads(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://ana:{PASSWORD}@mlflow.example")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    uris.tracking_credentials_to_env()
    import os

    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.example"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("ana", PASSWORD)


@pytest.mark.parametrize("field", ["tracking.tracking_uri", "hub.endpoint"])
def test_a_uri_with_credentials_is_refused_in_the_config(field):
    with pytest.raises(config_mod.ConfigError, match=rf"{field}: Value error, credentials in the URI would be "
                                                     "logged with the config") as caught:
        config_mod.load(ROOT / "configs" / "local.yaml", [f"{field}=http://ana:{PASSWORD}@h:5000"])
    assert PASSWORD not in str(caught.value)


def test_run_with_a_password_in_the_tracking_uri_never_echoes_it(tmp_path):
    from medtune.cli import app

    result = CliRunner().invoke(app, ["run", "--config", str(ROOT / "configs" / "local.yaml"),
                                      "--output-dir", str(tmp_path / "run")],
                                # the callback moves the login to these: restored after the invoke
                                env={"MLFLOW_TRACKING_URI": f"http://ana:{PASSWORD}@127.0.0.1:9",
                                     "MLFLOW_TRACKING_USERNAME": None, "MLFLOW_TRACKING_PASSWORD": None})
    assert result.exit_code == 1
    assert "http://127.0.0.1:9" in result.output and "not reachable" in result.output
    assert PASSWORD not in result.output and "ana:" not in result.output


def test_lineage_records_the_tracking_uri_without_credentials(tmp_path, tiny_config):
    from test_lineage import RUN, _build, _run

    cfg, artifacts, _ = _run(tmp_path, tiny_config)
    record = _build(cfg, artifacts, run={**RUN, "tracking_uri": f"http://ana:{PASSWORD}@mlflow:5000"})
    assert record["mlflow"]["tracking_uri"] == "http://mlflow:5000"
    assert PASSWORD not in json.dumps(record)


def test_a_run_cannot_redirect_pinned_fields(tiny_config, monkeypatch):
    """What a task pod sees: MEDTUNE_PINNED from the compiled YAML, the config from the run's parameter."""
    from medtune.steps import open_run

    monkeypatch.setenv(pins.ENV, pins.of(tiny_config))
    assert pins.enforce(tiny_config) is tiny_config
    hijacked = tiny_config.model_copy(update={
        "tracking": tiny_config.tracking.model_copy(update={"tracking_uri": "http://collector.evil:80"}),
        "hub": tiny_config.hub.model_copy(update={"endpoint": "https://hub.evil"})})
    with pytest.raises(pins.PinnedFieldChanged) as caught:
        open_run.run(hijacked.to_json(), "run-1")  # refused before anything connects anywhere
    assert "tracking.tracking_uri='http://collector.evil:80' (compiled: None)" in str(caught.value)
    assert "hub.endpoint='https://hub.evil' (compiled: None)" in str(caught.value)
    monkeypatch.delenv(pins.ENV)
    assert pins.enforce(hijacked) is hijacked, "kfp.local never sets the pins: the user's machine, the user's say"
