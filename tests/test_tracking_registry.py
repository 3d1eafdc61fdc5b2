"""A real MLflow server on loopback (SQLite backend): parent/nested runs, registration, pyfunc answers."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest

from medtune import registry, tracking


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tracking.local_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def _with_uri(cfg, uri):
    return cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": uri})})


def test_local_server_is_reused_and_only_its_starter_stops_it(tmp_path):
    state = tmp_path / "state"
    with tracking.local_server(state) as uri:
        assert uri.startswith("http://127.0.0.1:")
        with tracking.local_server(state) as again:
            assert again == uri
        assert tracking.healthy(uri), "the inner (reusing) context must not stop the server"
        assert (state / "mlflow.db").exists()
    assert not tracking.healthy(uri)
    assert not (state / "server.json").exists()


def test_parent_run_records_config_and_steps_nest_under_it(server, tiny_config):
    cfg = _with_uri(tiny_config, server)
    run_id = tracking.open_run(cfg, pipeline_run="kfp-run-1")
    with tracking.step(cfg, run_id, "train"):
        mlflow.log_metric("loss", 1.5)
    client = mlflow.MlflowClient(server)
    parent = client.get_run(run_id)
    assert parent.data.params["train.lora.r"] == str(cfg.train.lora.r)
    assert parent.data.params["model.id"] == cfg.model.id
    assert parent.data.tags["medtune.pipeline_run"] == "kfp-run-1"
    assert parent.data.tags["medtune.config_sha256"] == cfg.digest()
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    assert [c.data.tags["mlflow.runName"] for c in children] == ["train"]
    assert children[0].data.metrics["loss"] == 1.5


def test_registered_adapter_answers_through_pyfunc(server, tiny_config, tmp_path):
    from peft import get_peft_model

    from medtune import models, train

    cfg = _with_uri(tiny_config, server)
    model = get_peft_model(models.load_model(cfg.model, cfg.train), train.lora_config(cfg))
    model.save_pretrained(tmp_path / "adapter")
    run_id = tracking.open_run(cfg, pipeline_run="kfp-run-2")
    decision = {"passed": True, "summary": "all rules passed"}
    with tracking.step(cfg, run_id, "register"):
        result = registry.register(cfg, run_id, tmp_path / "adapter", decision, tmp_path)

    client = mlflow.MlflowClient(server)
    version = client.get_model_version_by_alias(cfg.tracking.registered_model, "challenger")
    assert version.version == result["version"]
    assert version.tags["medtune.run_id"] == run_id
    assert version.tags["medtune.gate"] == "passed"
    assert version.tags["medtune.config_sha256"] == cfg.digest()
    assert len(version.tags["medtune.git_sha"]) == 40 or version.tags["medtune.git_sha"] == "unknown"

    mlflow.set_tracking_uri(server)
    answers = mlflow.pyfunc.load_model(result["model_uri"]).predict(
        pd.DataFrame({"question": ["What is asthma?", "How is flu spread?"]}))
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)


def test_run_fails_fast_naming_an_unreachable_tracking_server(tmp_path):
    from typer.testing import CliRunner

    from conftest import ROOT
    from medtune.cli import app

    result = CliRunner().invoke(app, ["run", "--config", str(ROOT / "configs" / "local.yaml"),
                                      "--output-dir", str(tmp_path / "run")],
                                env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    assert result.exit_code == 1
    assert "http://127.0.0.1:9" in result.output and "not reachable" in result.output
    assert not (tmp_path / "run" / "artifacts").exists(), "nothing ran"
