"""A real MLflow server on loopback (SQLite backend): parent/nested runs, registration, pyfunc answers."""

from __future__ import annotations

import re

import mlflow
import pandas as pd
import pytest

from medtune import digests, registry, tracking


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
    # kfp.local runs every step in this virtualenv: no image ran, so none is named
    assert parent.data.tags["medtune.runner"] == "kfp.local"
    assert "medtune.image" not in children[0].data.tags and tracking.images_ran(run_id) is None


def test_a_run_in_task_pods_names_the_image_each_pod_ran(server, tiny_config, monkeypatch):
    """Each step tags the image its pod runs ($MEDTUNE_IMAGE, which `place` sets per task from the profile
    the YAML was compiled from), never an image named in the run-time config."""
    monkeypatch.setenv("KFP_POD_NAME", "medtune-abc-open-run")  # what the KFP launcher sets in a task pod
    cfg = _with_uri(tiny_config, server)
    run_id = tracking.open_run(cfg, pipeline_run="kfp-run-2")
    assert mlflow.MlflowClient(server).get_run(run_id).data.tags["medtune.runner"] == "kubernetes"
    ran = {"train": "registry.example/medtune-cuda:0.1.0@sha256:" + "ab" * 32,
           "gate": "registry.example/medtune-cpu:0.1.0"}
    for step, image in ran.items():
        monkeypatch.setenv("MEDTUNE_IMAGE", image)
        with tracking.step(cfg, run_id, step):
            pass
    assert tracking.images_ran(run_id) == dict(sorted(ran.items()))


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
    assert version.tags["medtune.git_sha"] == digests.git_sha()
    assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", version.tags["medtune.git_sha"])

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


def test_push_and_audit_link_run_registry_version_and_hub_commit(server, tiny_config, tmp_path, monkeypatch):
    """register -> push -> audit as the passing branch runs them, on a real server; the Hub is the local
    stand-in (tests/hub_standin.py) because the real one cannot be reached from here."""
    import json

    from peft import get_peft_model

    from hub_standin import HubStandIn
    from medtune import lineage, models, train
    from medtune.steps import audit, open_run, push, register

    token = "hf_standin_token"
    monkeypatch.setenv("HF_TOKEN", token)
    adapter = tmp_path / "adapter"
    get_peft_model(models.load_model(tiny_config.model, tiny_config.train),
                   train.lora_config(tiny_config)).save_pretrained(adapter)
    files = {"validation": {"summary": {"rows_read": 5, "rows_kept": 4, "rows_quarantined": 1,
                                        "source": lineage.source_record(tiny_config.data.path)}},
             "splits": {"splits": {"test": {"rows": 2, "fingerprint": "f" * 64}}},
             "comparison": {"n": 2, "base": {"rougeL": 0.1}, "candidate": {"rougeL": 0.2}, "ci": {}},
             "decision": {"passed": True, "summary": "1 of 1 rules passed", "checks": []}}
    paths = {name: tmp_path / name for name in files}
    for name, content in files.items():
        paths[name].write_text(json.dumps(content))
    with HubStandIn(token) as standin:
        cfg = _with_uri(tiny_config, server)
        cfg = cfg.model_copy(update={"hub": cfg.hub.model_copy(update={"repo_id": "org/qa", "endpoint": standin.url})})
        config_json = cfg.to_json()
        run_id = open_run.run(config_json, "medtune-run-3", "kfp-uuid-3", "ana")
        registration = register.run(config_json, run_id, str(adapter), str(paths["decision"]),
                                      str(tmp_path / "registration"))
        pushed = push.run(config_json, run_id, str(adapter), str(paths["decision"]), str(paths["comparison"]),
                            str(paths["splits"]), str(paths["validation"]), str(tmp_path / "registration"),
                            str(tmp_path / "hub_push"))
        card = standin.repos["org/qa"]["files"]["README.md"].decode()
    assert pushed["tags"] == [f"v{registration['version']}", f"run-{run_id}"]
    assert lineage.source_record(tiny_config.data.path)["sha256"] in card, "the card names the data by hash"
    keyed = {"validate_data/validation": paths["validation"], "preprocess/summary": paths["splits"],
             "train/adapter": adapter, "evaluate/comparison": paths["comparison"], "gate/decision": paths["decision"],
             "register/registration": tmp_path / "registration", "push/hub_push": tmp_path / "hub_push"}
    record = audit.run(config_json, run_id, {k: (str(p), str(p)) for k, p in keyed.items()},
                         str(tmp_path / "lineage"))

    assert record["run"]["pipeline_run"] == "medtune-run-3" and record["run"]["kfp_run_id"] == "kfp-uuid-3"
    assert record["run"]["started_by"] == "ana", "who asked for the run, not the step's OS user"
    assert record["hub"]["commit"] == pushed["commit"]
    client = mlflow.MlflowClient(server)
    version = client.get_model_version(registration["name"], registration["version"])
    digest = lineage.sha256_file(tmp_path / "lineage")
    assert version.tags["medtune.hub_commit"] == pushed["commit"] and version.tags["medtune.hub_repo"] == "org/qa"
    assert version.tags["medtune.lineage_sha256"] == digest == client.get_run(run_id).data.tags[
        "medtune.lineage_sha256"]
    # a local base model: named by the content hash of its directory, on the run and the version alike
    assert len(record["base_model"]["sha256"]) == 64 and record["base_model"]["commit"] is None
    for tags in (version.tags, client.get_run(run_id).data.tags):
        assert tags["medtune.base_model_sha256"] == record["base_model"]["sha256"]
        assert "medtune.base_model_commit" not in tags
    mlflow.set_tracking_uri(server)
    logged = mlflow.artifacts.load_text(f"runs:/{run_id}/lineage/lineage.json")
    assert logged == (tmp_path / "lineage").read_text()
    assert token not in logged
