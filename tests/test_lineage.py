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


def _build(cfg, artifacts: dict, images: dict | None = None, run: dict = RUN) -> dict:
    """The record as the audit step builds it: the documents it reads are found through the step specs."""
    keyed = {key: (stored.uri, str(stored.path)) for key, stored in artifacts.items()}
    return lineage.build(cfg, run, artifacts, audit.documents(keyed), images)


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
    result = lineage.verify(path)
    # adapter + 6 single files + data + the base model's files + the lock at the recorded commit (if committed)
    code_checked = int(record["code"]["git_sha"].isalnum() and len(record["code"]["git_sha"]) == 40)
    assert (result.problems, result.unreachable) == ([], [])
    assert result.checked == 2 + 6 + 1 + len(model_files) + code_checked
    assert result.skipped[-1] == ("MLflow at (none given) is not reachable: lineage.json's sha256 was not compared "
                                  "with the medtune.lineage_sha256 tag of run abc123 and model version medtune-qa/4")


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
    model_files = len(lineage.hash_files(Path(tiny_config.model.id)))
    assert result.problems == [] and result.checked - model_files in (1, 2), \
        "only the data file, the base model and the lock at the commit are reachable from here"
    assert sorted(result.unreachable) == sorted(s.uri for s in remote.values())


@pytest.mark.parametrize("content, message", [
    ({"schema": "medtune.lineage/1"}, f"unknown schema 'medtune.lineage/1' (expected {lineage.SCHEMA})"),
    ({"schema": lineage.SCHEMA}, "malformed audit record: run: Field required; code: Field required"),
    ([1, 2], "not an audit record (a JSON list, expected an object)"),
    ('{"schema": "medtune.lin', "not a readable JSON audit record"),
])
def test_bare_or_malformed_records_are_clear_errors(tmp_path, content, message):
    path = _write(tmp_path / "lineage.json", content)
    with pytest.raises(lineage.RecordError) as caught:
        lineage.verify(path)
    assert str(caught.value).startswith(f"{path}: {message}")
    result = CliRunner().invoke(app, ["verify", str(path)])
    shown = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code == 2 and message.split(":")[0] in shown and "Traceback" not in shown
    assert CliRunner().invoke(app, ["lineage", str(path)]).exit_code == 2


def test_a_field_of_the_wrong_type_is_named(tmp_path, tiny_config):
    cfg, artifacts, _ = _run(tmp_path, tiny_config)
    record = _build(cfg, artifacts)
    record["data"]["files"] = ["data.jsonl"]
    del record["mlflow"]["run_id"]
    path = lineage.write(record, tmp_path / "lineage.json")
    with pytest.raises(lineage.RecordError, match=r"data\.files: Input should be a valid dictionary; "
                                                  r"mlflow\.run_id: Field required"):
        lineage.verify(path)


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


def test_verify_rehashes_the_base_model(tmp_path, tiny_config):
    import shutil

    model_dir = Path(shutil.copytree(tiny_config.model.id, tmp_path / "base"))
    cfg, artifacts, _ = _run(tmp_path, tiny_config)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"id": str(model_dir)})})
    path = lineage.write(_build(cfg, artifacts), tmp_path / "lineage.json")
    assert lineage.verify(path).problems == []
    (model_dir / "config.json").write_text((model_dir / "config.json").read_text().replace("64", "65", 1))
    [problem] = lineage.verify(path).problems
    assert problem.startswith(f"base model changed: {model_dir} (sha256 ")


def test_verify_checks_the_lock_at_the_recorded_commit(tmp_path, tiny_config):
    import subprocess

    cfg, artifacts, _ = _run(tmp_path, tiny_config)
    record = _build(cfg, artifacts)
    root = lineage.LOCK.parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    committed = subprocess.run(["git", "show", f"{head}:requirements.lock"], cwd=root, capture_output=True).stdout
    import hashlib

    record["code"] = {**record["code"], "git_sha": head,
                      "lock": {"path": "requirements.lock", "sha256": hashlib.sha256(committed).hexdigest()}}
    assert lineage.verify(lineage.write(record, tmp_path / "ok.json")).problems == []
    record["code"]["lock"]["sha256"] = "0" * 64  # packages other than the commit's
    [problem] = lineage.verify(lineage.write(record, tmp_path / "bad.json")).problems
    assert problem.startswith(f"code: requirements.lock at commit {head[:12]} hashes to ")
    record["code"]["git_sha"] = "f" * 40
    result = lineage.verify(lineage.write(record, tmp_path / "gone.json"))
    assert f"code: commit {'f' * 40} is not in the checkout at {root}" in result.skipped
    record["code"]["git_sha"] = f"{head}-dirty"
    result = lineage.verify(lineage.write(record, tmp_path / "dirty.json"))
    assert f"code: the run's code cannot be recomputed (uncommitted changes on top of {head})" in result.skipped


def test_hub_dataset_is_recorded_by_commit_and_rechecked(tmp_path, tiny_config, monkeypatch):
    """The Hub is unreachable here: the dataset's snapshot is laid out in a Hub cache the way huggingface_hub
    writes it when the ingest downloads it (refs/<branch> -> snapshots/<commit>/files); that much is faked,
    the code reading it (huggingface_hub's snapshot lookup, the hashing) is the real one."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    commit = "fedcba9876543210fedcba9876543210fedcba98"
    repo = tmp_path / "hub" / "datasets--org--medqa"
    _write(repo / "refs" / "main", commit)
    rows = _write(repo / "snapshots" / commit / "data" / "train.jsonl", '{"question": "q?", "answer": "a"}\n')
    source = lineage.source_record("hf://org/medqa", "main")
    assert source == {"path": "hf://org/medqa", "revision": "main", "commit": commit,
                      "sha256": lineage.tree_digest({"data/train.jsonl": lineage.sha256_file(rows)}),
                      "files": {"data/train.jsonl": lineage.sha256_file(rows)}}
    assert lineage.source_record("hf://org/other", "main")["commit"] is None, "not downloaded: not guessed"

    cfg, artifacts, _ = _run(tmp_path, tiny_config)
    record = _build(cfg, artifacts)
    record["data"] = {**record["data"], **source}
    path = lineage.write(record, tmp_path / "lineage.json")
    assert lineage.verify(path).problems == []
    _write(repo / "refs" / "main", "1" * 40)  # the branch moved on: the recorded commit is what is checked
    assert lineage.verify(path).problems == []
    rows.write_text('{"question": "q?", "answer": "b"}\n')
    assert lineage.verify(path).problems == [f"data file changed: {rows.parents[1] / 'data/train.jsonl'} (sha256 "
                                             f"{lineage.sha256_file(rows)[:12]}..., recorded "
                                             f"{source['files']['data/train.jsonl'][:12]}...)"]


def test_a_record_rehashed_after_tampering_fails_on_the_mlflow_tag(tmp_path, tiny_config):
    """The attack `verify` alone cannot see: change a data file, then re-hash it into lineage.json. The
    record's own sha256 no longer matches the tag the audit step set on the run and the version."""
    import mlflow

    from medtune import tracking

    cfg, artifacts, data = _run(tmp_path, tiny_config)
    with tracking.local_server(tmp_path / "mlflow") as uri:
        client = mlflow.MlflowClient(uri)
        run = client.create_run(client.create_experiment("audit"))
        run_id = run.info.run_id
        client.create_registered_model("medtune-qa")
        version = client.create_model_version("medtune-qa", f"{run.info.artifact_uri}/model", run_id).version
        registration = {**REGISTRATION, "version": str(version)}
        _write(artifacts["register/registration"].path, registration)
        record = _build(cfg, artifacts, run={**RUN, "mlflow_run_id": run_id, "tracking_uri": uri})
        path = lineage.write(record, tmp_path / "out" / "lineage.json")
        digest = lineage.sha256_file(path)
        client.set_tag(run_id, lineage.TAG, digest)  # what the audit step does
        client.set_model_version_tag("medtune-qa", str(version), lineage.TAG, digest)
        assert lineage.verify(path, uri).problems == []

        data.write_text('{"question": "What is flu?", "answer": "Something else entirely."}\n')
        record["data"].update(lineage.source_record(str(data)))  # the tamperer re-hashes it
        lineage.write(record, path)
        problems = lineage.verify(path, uri).problems
        assert problems == [
            f"lineage.json: sha256 {lineage.sha256_file(path)[:12]}... differs from the {lineage.TAG} tag on "
            f"MLflow run {run_id} ({digest[:12]}...): the record was changed after the run",
            f"lineage.json: sha256 {lineage.sha256_file(path)[:12]}... differs from the {lineage.TAG} tag on "
            f"model version medtune-qa/{version} ({digest[:12]}...): the record was changed after the run"]
        result = CliRunner().invoke(app, ["verify", str(path.parent), "--tracking-uri", uri])
        assert result.exit_code == 1 and "the record was changed after the run" in " ".join(result.output.split())
