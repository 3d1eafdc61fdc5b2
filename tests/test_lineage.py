"""The audit record: every hash is recomputed by `verify`, and tampering is named down to the file."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from medtune import lineage
from medtune.cli import app


def _fake_run(tmp_path: Path, tiny_config) -> tuple[Path, Path]:
    """A run directory laid out as kfp.local leaves it (the pipeline itself is tested end to end elsewhere)."""
    out = tmp_path / "run"
    adapter = out / "artifacts" / "medtune-1" / "train" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00weights" * 100)
    (adapter / "adapter_config.json").write_text('{"r": 16}')
    summary_dir = out / "artifacts" / "medtune-1" / "preprocess"
    summary_dir.mkdir(parents=True)
    (summary_dir / "summary").write_text(json.dumps({"splits": {"test": {"rows": 3, "fingerprint": "ab" * 32}}}))
    (out / "artifacts" / "medtune-1" / "train" / "executor_output.json").write_text("{}")
    data = tmp_path / "data.jsonl"
    data.write_text('{"question": "What is flu?", "answer": "A viral infection."}\n')
    cfg = tiny_config.model_copy(update={"data": tiny_config.data.model_copy(update={"path": str(data)})})
    summary = {"run_id": "abc123", "output_dir": str(out), "gate": {"passed": True, "summary": "ok"},
               "metrics": {"base": {}, "candidate": {}}, "model_version": "m/1", "tracking_uri": "http://x"}
    return lineage.write(lineage.build(cfg, summary), out), data


def test_record_links_inputs_and_outputs_by_hash(tmp_path, tiny_config):
    path, data = _fake_run(tmp_path, tiny_config)
    record = json.loads(path.read_text())
    assert record["schema"] == lineage.SCHEMA
    assert record["config"]["sha256"] == tiny_config.model_copy(
        update={"data": tiny_config.data.model_copy(update={"path": str(data)})}).digest()
    assert record["data"]["files"] == {"data.jsonl": lineage.sha256_file(data)}
    model_files = lineage.hash_files(Path(tiny_config.model.id))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(model_files)
    assert record["base_model"]["sha256"] == lineage.tree_digest(model_files), "identified by its content"
    assert set(record["artifacts"]) == {"medtune-1/train/adapter/adapter_model.safetensors",
                                        "medtune-1/train/adapter/adapter_config.json",
                                        "medtune-1/preprocess/summary"}
    assert record["splits"] == {"test": {"rows": 3, "fingerprint": "ab" * 32}}
    assert lineage.verify(path) == []


def test_verify_names_the_tampered_adapter_and_changed_data(tmp_path, tiny_config):
    path, data = _fake_run(tmp_path, tiny_config)
    weights = path.parent / "artifacts" / "medtune-1" / "train" / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"!")
    data.write_text(data.read_text() + '{"question": "What is a cold?", "answer": "A virus."}\n')
    problems = lineage.verify(path)
    assert len(problems) == 2
    assert problems[0].startswith(f"artifact changed: {weights}")
    assert problems[1].startswith(f"data file changed: {data}")

    result = CliRunner().invoke(app, ["verify", str(path.parent)])
    assert result.exit_code == 1
    assert "adapter_model.safetensors" in result.output


def test_find_by_run_id(tmp_path, tiny_config):
    path, _ = _fake_run(tmp_path, tiny_config)
    assert lineage.find("abc123", runs_dir=tmp_path) == path
    assert lineage.find(str(path.parent)) == path
