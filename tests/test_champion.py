"""The champion is scored on the profile's base model, never on one the registry names.

A real MLflow server; the registry entries are crafted the way someone with write access to the registry
could craft them (a stored config asking for a `pypi_gguf` package, another base model in the tags,
pickled weights), and the adapter is a real LoRA adapter of the tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from conftest import SAMPLE
from medtune import champion as champ
from medtune import evaluate as ev
from medtune import models, tracking
from medtune.config import ModelConfig, TrainConfig

NAME = "medtune-crafted"


def _adapter(model_dir: Path, path: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    model = models.load_model(ModelConfig(id=str(model_dir), source="path"), TrainConfig())
    get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                     init_lora_weights=False)).save_pretrained(path)
    return path


def _register(client, folder: Path, tags: dict[str, str]) -> str:
    """A version whose artifacts are `folder`, with the alias champion: what a registry writer can make."""
    experiment = client.get_experiment_by_name("crafted") or client.get_experiment(client.create_experiment("crafted"))
    run = client.create_run(experiment.experiment_id)
    client.log_artifacts(run.info.run_id, str(folder), "model")
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name = '{NAME}'"):
        client.create_registered_model(NAME)
    version = client.create_model_version(NAME, f"{run.info.artifact_uri}/model", run.info.run_id, tags=tags).version
    client.set_registered_model_alias(NAME, champ.ALIAS, version)
    return str(version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    import os

    before = os.environ.get("MLFLOW_TRACKING_URI")
    with tracking.local_server(tmp_path_factory.mktemp("mlflow")) as uri:
        mlflow.set_tracking_uri(uri)  # (exports $MLFLOW_TRACKING_URI)
        yield mlflow.MlflowClient(uri)
    # later tests must not find this stopped server in the environment
    mlflow.set_tracking_uri(before or "")
    os.environ.pop("MLFLOW_TRACKING_URI", None) if before is None else os.environ.update(MLFLOW_TRACKING_URI=before)


def test_a_crafted_config_in_the_registry_does_not_choose_the_base_model(registry, tiny_config, tmp_path,
                                                                        monkeypatch):
    artifacts = tmp_path / "entry"
    _adapter(Path(tiny_config.model.id), artifacts / "artifacts" / "adapter")
    crafted = json.loads(tiny_config.to_json())
    crafted["model"] = {"id": "evil/model", "source": "pypi_gguf", "gguf_package": "evil-package==6.6.6",
                        "gguf_file": "evil.gguf"}
    (artifacts / "artifacts" / "config.json").write_text(json.dumps(crafted))
    (artifacts / "python_model.pkl").write_bytes(b"MLflow's pyfunc pickle: never loaded by evaluate")
    version = _register(registry, artifacts, {"medtune.base_model": tiny_config.model.id,
                                              "medtune.base_model_revision": tiny_config.model.revision})
    # pip download is how a pypi_gguf model is fetched: reaching it from here would install the package
    monkeypatch.setattr(models, "_fetch_gguf", lambda *a: pytest.fail("a registry string reached pip download"))
    champion, info = champ.fetch(NAME, tmp_path / "dl", tiny_config.model)
    assert info["available"] and info["version"] == version and champion.adapter_dir.name == "adapter"
    assert not hasattr(champion, "model"), "a champion carries no base model of its own"
    rows = pd.read_json(SAMPLE, lines=True).iloc[:4]
    result = ev.evaluate(tiny_config, rows, None, None, champion, info, perplexity_split="test")
    assert set(result.runs) == {"base", "champion"} and result.champion_info["scored"]
    assert result.predictions["champion_answer"].tolist() != result.predictions["base_answer"].tolist()


def test_a_champion_of_another_base_model_is_skipped_with_the_reason(registry, tiny_config, tmp_path):
    artifacts = tmp_path / "entry"
    _adapter(Path(tiny_config.model.id), artifacts / "artifacts" / "adapter")
    version = _register(registry, artifacts, {"medtune.base_model": "Qwen/Qwen2.5-0.5B",
                                              "medtune.base_model_revision": "main"})
    champion, info = champ.fetch(NAME, tmp_path / "dl", tiny_config.model)
    assert champion is None and info["available"] is False
    assert info["reason"].startswith(f"champion {NAME} version {version} was trained on Qwen/Qwen2.5-0.5B@main")
    assert not (tmp_path / "dl").exists(), "nothing was downloaded"


def test_pickled_weights_in_the_champion_are_refused(registry, tiny_config, tmp_path):
    artifacts = tmp_path / "entry"
    adapter = _adapter(Path(tiny_config.model.id), artifacts / "artifacts" / "adapter")
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04 a pickle would run code on load")
    (artifacts / "python_model.pkl").write_bytes(b"MLflow's pyfunc pickle: never loaded by evaluate")
    _register(registry, artifacts, {"medtune.base_model": tiny_config.model.id})
    with pytest.raises(champ.UnsafeChampion, match=r"pickled files in its weights \(artifacts/adapter/"
                                                   r"adapter_model\.bin\)"):
        champ.fetch(NAME, tmp_path / "dl", tiny_config.model)
