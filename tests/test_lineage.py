"""The audit record: built from the artifacts a run produced, every hash recomputed by `verify`, tampering
named down to the file. The in-DAG `audit` step that writes it is run for real in test_pipeline_local.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtune import lineage, models
from medtune.steps import audit
from medtune.cli import app

RUN = {"mlflow_run_id": "abc123", "pipeline_run": "medtune-2026", "kfp_run_id": "9f0e", "started_by": "ana",
       "tracking_uri": "http://127.0.0.1:5000"}
SPLITS = {"train": {"rows": 7, "fingerprint": "aa" * 32}, "test": {"rows": 3, "fingerprint": "ab" * 32}}
REGISTRATION = {"name": "medtune-qa", "version": "4", "model_uri": "models:/m-1", "aliases": ["challenger"]}
HUB = {"pushed": True, "repo_id": "org/qa", "commit": "c0ffee", "tags": ["v4", "run-abc123"]}


def _write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _run(tmp_path: Path, tiny_config, passed: bool = True) -> tuple:
    """The artifacts of one pipeline run, laid out as kfp.local leaves them (keyed as the audit step keys them)."""
    data = _write(tmp_path / "data.jsonl", '{"question": "What is flu?", "answer": "A viral infection."}\n')
    cfg = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"path": str(data)})})
    root = tmp_path / "artifacts" / "medtune-1"
    adapter = root / "train" / "adapter"
    _write(adapter / "adapter_model.safetensors", "\x00weights" * 100)
    _write(adapter / "adapter_config.json", '{"r": 16}')
    _write(root / "train" / "executor_output.json", "{}")  # kfp.local's bookkeeping, not an output
    summary = {"rows_read": 3, "rows_kept": 2, "rows_quarantined": 1, "source": lineage.source_record(str(data))}
    paths = {
        "validate_data/validation": _write(root / "validate-data" / "validation", {"summary": summary}),
        "preprocess/summary": _write(root / "preprocess" / "summary", {"splits": SPLITS}),
        "train/adapter": adapter,
        "evaluate/comparison": _write(root / "evaluate" / "comparison",
                                      {"base": {"rougeL": 0.15}, "candidate": {"rougeL": 0.2}, "ci": {}}),
        "gate/decision": _write(root / "gate" / "decision", {"passed": passed, "summary": "2 of 2 rules passed"}),
    }
    if passed:
        paths["register/registration"] = _write(root / "register" / "registration", REGISTRATION)
        paths["push/hub_push"] = _write(root / "push" / "hub_push", HUB)
    artifacts = {key: lineage.Stored(str(path), path) for key, path in paths.items()}
    return cfg, artifacts, data


def _build(cfg, artifacts: dict, images: dict | None = None) -> dict:
    """The record as the audit step builds it: the documents it reads are found through the step specs."""
    keyed = {key: (stored.uri, str(stored.path)) for key, stored in artifacts.items()}
    return lineage.build(cfg, RUN, artifacts, audit.documents(keyed), images)


def test_record_links_inputs_and_outputs_by_hash(tmp_path, tiny_config):
    cfg, artifacts, data = _run(tmp_path, tiny_config)
    record = _build(cfg, artifacts)
    assert record["schema"] == lineage.SCHEMA
    assert record["run"] == {**{k: RUN[k] for k in ("mlflow_run_id", "pipeline_run", "kfp_run_id", "started_by")},
                             "runner": "kfp.local"}
    assert record["images"] is None, "kfp.local runs every task in this virtualenv, not in the images"
    assert record["config"]["sha256"] == cfg.digest()
    assert record["code"]["lock"]["sha256"] == lineage.sha256_file(lineage.LOCK)
    assert record["data"]["files"] == {"data.jsonl": lineage.sha256_file(data)}
    assert (record["data"]["rows_read"], record["data"]["rows_kept"], record["data"]["rows_quarantined"]) == (3, 2, 1)
    model_files = lineage.hash_files(Path(tiny_config.model.id))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(model_files)
    assert record["base_model"]["sha256"] == lineage.tree_digest(model_files), "identified by its content"
    assert set(record["artifacts"]) == set(artifacts)
    adapter = record["artifacts"]["train/adapter"]
    assert set(adapter["files"]) == {"adapter_model.safetensors", "adapter_config.json"}
    assert adapter["sha256"] == lineage.tree_digest(adapter["files"])
    assert record["splits"] == SPLITS
    assert record["metrics"]["candidate"] == {"rougeL": 0.2}
    assert record["gate"]["passed"] and "gate policy sha256" in record["gate"]["approved_by"]
    assert record["mlflow"] == {"tracking_uri": RUN["tracking_uri"], "run_id": "abc123", "model_version": "medtune-qa/4",
                                "model_uri": "models:/m-1", "aliases": ["challenger"]}
    assert record["hub"] == HUB
    path = lineage.write(record, tmp_path / "lineage.json")
    assert lineage.verify(path) == lineage.Verification([], 2 + 6 + 1, [])  # adapter + 6 single files + data


def test_a_rejected_run_has_no_registry_or_hub_entries(tmp_path, tiny_config):
    cfg, artifacts, _ = _run(tmp_path, tiny_config, passed=False)
    record = _build(cfg, artifacts)
    assert not record["gate"]["passed"]
    assert record["mlflow"]["model_version"] is None and record["hub"] is None
    assert "register/registration" not in record["artifacts"]


def test_verify_names_the_tampered_adapter_and_changed_data(tmp_path, tiny_config):
    cfg, artifacts, data = _run(tmp_path, tiny_config)
    path = lineage.write(_build(cfg, artifacts), tmp_path / "out" / "lineage.json")
    weights = artifacts["train/adapter"].path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"!")
    data.write_text(data.read_text() + '{"question": "What is a cold?", "answer": "A virus."}\n')
    artifacts["gate/decision"].path.unlink()
    problems = lineage.verify(path).problems
    assert len(problems) == 3, problems
    assert problems[0] == f"artifact missing: {artifacts['gate/decision'].path}"
    assert problems[1].startswith(f"artifact changed: {weights} (sha256 ")
    assert problems[2].startswith(f"data file changed: {data}")

    result = CliRunner().invoke(app, ["verify", str(path.parent)])
    assert result.exit_code == 1
    assert "adapter_model.safetensors" in result.output and "MISMATCH" in result.output


def test_cluster_record_names_images_and_leaves_remote_artifacts_unchecked(tmp_path, tiny_config, monkeypatch):
    monkeypatch.setenv("KFP_POD_NAME", "medtune-xyz-audit")  # what the KFP launcher sets in a task pod
    cfg, artifacts, _ = _run(tmp_path, tiny_config)
    remote = {k: lineage.Stored(f"minio://mlpipeline/v2/artifacts/{k}", a.path) for k, a in artifacts.items()}
    ran = {"gate": "ghcr.io/medtune/medtune-cpu:0.1.0", "train": "ghcr.io/medtune/medtune-cuda:0.1.0"}
    record = _build(cfg, remote, ran)  # what the steps' pods tagged (tests/test_tracking_registry.py)
    assert record["run"]["runner"] == "kubernetes"
    assert record["images"] == ran
    result = lineage.verify(lineage.write(record, tmp_path / "lineage.json"))
    assert result.problems == [] and result.checked == 1, "only the data file is reachable from here"
    assert sorted(result.unreachable) == sorted(s.uri for s in remote.values())


def test_unknown_schema_is_refused(tmp_path):
    path = _write(tmp_path / "lineage.json", {"schema": "medtune.lineage/1"})
    assert lineage.verify(path).problems == [f"{path}: unknown schema 'medtune.lineage/1' "
                                             f"(expected {lineage.SCHEMA})"]


def test_find_by_run_id_directory_or_file(tmp_path, tiny_config):
    cfg, artifacts, _ = _run(tmp_path, tiny_config)
    path = lineage.write(_build(cfg, artifacts), tmp_path / "runs" / "one" / "lineage.json")
    assert lineage.find("abc123", runs_dir=tmp_path / "runs") == path
    assert lineage.find(str(path.parent)) == path == lineage.find(str(path))
    with pytest.raises(FileNotFoundError, match="no lineage.json for 'nope'"):
        lineage.find("nope", runs_dir=tmp_path / "runs")


def test_lineage_command_prints_the_record(tmp_path, tiny_config):
    cfg, artifacts, _ = _run(tmp_path, tiny_config)
    path = lineage.write(_build(cfg, artifacts), tmp_path / "lineage.json")
    result = CliRunner().invoke(app, ["lineage", str(path)])
    assert result.exit_code == 0, result.output
    for text in ("abc123", "medtune-qa/4", "org/qa@c0ffee", "rougeL 0.2000", "3 rows read, 2 kept, 1 quarantined",
                 "kfp.local"):
        assert text in result.output, text


def test_hub_base_model_is_identified_by_its_cached_snapshot_commit(tmp_path, monkeypatch):
    """The layout huggingface_hub writes when from_pretrained downloads a model; read without a network."""
    from huggingface_hub import constants

    from medtune.config import ModelConfig

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--Qwen--Qwen2.5-0.5B"
    _write(repo / "refs" / "main", commit)
    _write(repo / "snapshots" / commit / "config.json", "{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert models.hub_commit(ModelConfig(id="Qwen/Qwen2.5-0.5B")) == commit
    assert models.hub_commit(ModelConfig(id="Qwen/Qwen2.5-1.5B")) is None, "not cached: unknown, not guessed"
