"""End to end: the committed compiled DAG runs with kfp.local the default run, as `scripts/run` does.

One `medtune run` subprocess (the same entry point users call) with the SHIPPED profile, configs/local.yaml:
the real SmolLM2 model, the shipped MedQuAD slice, the shipped suites and the shipped gate policy. Only the
registered model's name and the data path (absolute, as the run happens in a temporary directory) are set.
The default recipe earns its pass under the shipped policy (significantly better than base on its own split,
not significantly worse on MMLU medical and K-QA): the run takes the passing branch, registered, pushed
(skipped: no Hub repo) and audited. Training is deterministic on a machine (same data order, seed and
threads), so this is the same decision every time here. tests/test_gate_dag.py is a run that must fail
(harmful data); the tests below that look at the record also hold for a failing run.
"""

from __future__ import annotations

import getpass
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from conftest import ROOT
from medtune import config as config_mod
from medtune import lineage

pytestmark = pytest.mark.slow

MEDTUNE = Path(sys.executable).parent / "medtune"
SHIPPED = config_mod.load(ROOT / "configs" / "local.yaml")
DATA = ROOT / SHIPPED.data.path
OVERRIDES = {"data.path": str(DATA), "tracking.registered_model": "medtune-it"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("e2e")
    args = [str(MEDTUNE), "run", "--config", str(ROOT / "configs" / "local.yaml"), "--json",
            "--output-dir", str(workdir / "runs" / "e2e")]
    for key, value in OVERRIDES.items():
        args += ["--set", f"{key}={value}"]
    assert config_mod.load(ROOT / "configs" / "local.yaml", [f"{k}={v}" for k, v in OVERRIDES.items()]) \
        .policy_digest() == SHIPPED.policy_digest(), "the shipped policy, unchanged"
    # Earlier tests point MLflow at servers they have since stopped (mlflow.set_tracking_uri exports
    # MLFLOW_TRACKING_URI); this run must start its own.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(args, cwd=workdir, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary["workdir"] = workdir
    return summary


def _artifact(summary: dict, task: str, name: str) -> Path:
    found = list(Path(summary["output_dir"]).glob(f"artifacts/*/{task}/{name}"))
    assert len(found) == 1, f"expected one {task}/{name}, found {found}"
    return found[0]


def test_validation_counts_add_up(run):
    report = json.loads(_artifact(run, "validate-data", "validation").read_text())["summary"]
    assert report["rows_read"] == sum(1 for line in DATA.read_text().splitlines() if line.strip())
    assert report["rows_read"] == report["rows_kept"] + report["rows_quarantined"]
    quarantine = pd.read_json(_artifact(run, "validate-data", "quarantine"), lines=True)
    assert len(quarantine) == report["rows_quarantined"]
    assert report["rows_kept"] > 100
    # The shipped slice may be clean: an empty quarantine file reads as a frame with no columns.
    assert set(quarantine.get("rule", [])) <= set(report["quarantined_by_rule"])
    docs = _artifact(run, "validate-data", "data_docs").read_text()
    assert "<html" in docs.lower() and "expectation" in docs.lower()


def test_splits_are_disjoint_and_fingerprinted(run):
    summary = json.loads(_artifact(run, "preprocess", "summary").read_text())
    questions = {}
    for name in ("train", "validation", "test"):
        split = pd.read_json(next(_artifact(run, "preprocess", f"{name}_split").glob("*.jsonl")), lines=True)
        assert len(split) == summary["splits"][name]["rows"] > 0
        assert len(summary["splits"][name]["fingerprint"]) == 64
        questions[name] = set(split["question"].str.lower())
    assert not questions["train"] & questions["test"]
    assert not questions["train"] & questions["validation"]


def test_training_loss_is_finite_and_falls(run):
    history = json.loads(_artifact(run, "finish", "history").read_text())  # the winning trial's, finished
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == max(h["step"] for h in history) // SHIPPED.train.logging_steps
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    adapter = Path(run["adapter"])
    assert (adapter / "adapter_model.safetensors").stat().st_size > 100_000
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == SHIPPED.train.lora.r


def test_metrics_in_range_for_base_and_candidate(run):
    for model in ("base", "candidate"):
        metrics = run["metrics"][model]
        for name in ("exact_match", "token_f1", "rouge1", "rouge2", "rougeL"):
            assert 0.0 <= metrics[name] <= 1.0, (model, name, metrics[name])
        assert 0.0 <= metrics["bleu"] <= 100.0
    # Same test rows for both models: the fine-tune changed what the model says.
    assert run["metrics"]["base"] != run["metrics"]["candidate"]


def test_gate_decision_follows_its_rules(run):
    decision = json.loads(Path(run["decision"]).read_text())
    assert decision["checks"], "the decision lists its rules"
    ops = {">=": float.__ge__, "<=": float.__le__, ">": float.__gt__, "<": float.__lt__}
    for check in decision["checks"]:
        if check["verdict"] == "N/A":  # e.g. no champion yet: reported, not blocking
            assert check["value"] is None and check["reason"], check
            continue
        measured = check["value"] is not None and math.isfinite(check["value"])
        expected = measured and ops[check["op"]](float(check["value"]), float(check["bound"]))
        assert check["passed"] == expected and check["verdict"] == ("PASS" if expected else "FAIL"), check
    assert decision["passed"] == all(c["passed"] for c in decision["checks"]) == run["gate"]["passed"]
    assert "report" in run and Path(run["report"]).read_text().count("<img") >= 2


def test_the_default_run_passes_the_shipped_policy_and_is_registered(run):
    decision = json.loads(Path(run["decision"]).read_text())
    assert decision["policy_sha256"] == SHIPPED.policy_digest()
    # beat base on its own split, and not significantly worse than base on every shipped suite
    sets = {c["suite"] for c in decision["checks"] if c["check"] in ("significant", "non_inferior")}
    assert sets == {"test", *(s.name for s in SHIPPED.eval.suites)}
    assert run["gate"]["passed"] is True, decision["summary"]
    assert all(c["passed"] for c in decision["checks"] if c["verdict"] != "N/A")
    name, version = run["model_version"].split("/")
    assert name == OVERRIDES["tracking.registered_model"]
    registration = json.loads(_artifact(run, "register", "registration").read_text())
    assert registration["version"] == version
    assert run["hub"] == {"pushed": False, "reason": "hub.repo_id is not set"}


def test_mlflow_parent_run_has_every_step(run):
    db = run["workdir"] / ".medtune" / "mlflow" / "mlflow.db"
    assert db.exists(), "the local server keeps its state in SQLite under the working directory"
    # The server this run started is stopped; read the SQLite store directly.
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    parent = client.get_run(run["run_id"])
    assert parent.data.params["train.method"] == "lora"
    assert parent.data.tags["medtune.gate"] == ("passed" if run["gate"]["passed"] else "failed")
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run['run_id']}'")
    steps = {c.data.tags["mlflow.runName"] for c in children}
    assert {"validate_data", "preprocess", "train", "select", "evaluate", "gate", "audit"} <= steps
    assert ({"register", "push"} <= steps) == run["gate"]["passed"]


def test_the_audit_step_writes_one_record_linked_from_mlflow(run):
    # one audit per run: `audit` in the passing branch, `audit-2` in the failing one
    ran, other = ("audit", "audit-2") if run["gate"]["passed"] else ("audit-2", "audit")
    written = _artifact(run, ran, "lineage")
    assert Path(run["lineage"]).read_bytes() == written.read_bytes(), "the run folder keeps the step's record"
    assert not list(Path(run["output_dir"]).glob(f"artifacts/*/{other}"))
    record = json.loads(written.read_text())
    assert record["run"]["mlflow_run_id"] == run["run_id"] and record["run"]["runner"] == "kfp.local"
    assert record["run"]["started_by"] == getpass.getuser()
    assert record["run"]["pipeline_run"] == written.parents[1].name
    assert record["mlflow"]["model_version"] == run["model_version"]
    assert record["data"]["path"] == str(DATA) and len(record["data"]["files"]) >= 1
    assert record["data"]["rows_read"] == record["data"]["rows_kept"] + record["data"]["rows_quarantined"]
    assert record["splits"]["test"]["rows"] > 0
    base = record["base_model"]
    assert base["source"] == "pypi_gguf" and len(base["sha256"]) == 64, "a converted model: by its content"
    adapter = record["artifacts"]["preference/adapter"]  # what evaluate read: the winning trial's, passed on
    assert adapter["uri"] == run["adapter"] and "adapter_model.safetensors" in adapter["files"]
    # one trial (no screen) and preference.enabled false: finish and preference pass the trial's adapter on
    assert adapter["files"] == record["artifacts"]["finish/adapter"]["files"] == \
        record["artifacts"]["select/adapter"]["files"]
    assert record["preference"]["enabled"] is False
    assert set(record["artifacts"]) >= {"validate_data/quarantine", "preprocess/test_split", "gate/report"}
    assert ({"register/registration", "push/hub_push"} <= set(record["artifacts"])) == run["gate"]["passed"]

    db = run["workdir"] / ".medtune" / "mlflow" / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    digest = lineage.sha256_file(written)
    assert client.get_run(run["run_id"]).data.tags["medtune.lineage_sha256"] == digest
    if run["model_version"]:
        name, version = run["model_version"].split("/")
        assert client.get_model_version(name, version).tags["medtune.lineage_sha256"] == digest


def test_lineage_verifies_then_names_a_tampered_adapter(run):
    """Runs last: it changes the run's adapter."""
    verify = [str(MEDTUNE), "verify", run["run_id"]]  # by run id, from the directory `medtune run` ran in
    ok = subprocess.run(verify, capture_output=True, text=True, cwd=run["workdir"])
    assert ok.returncode == 0, ok.stderr
    assert "verified:" in ok.stderr and "not checked" not in ok.stderr

    weights = Path(run["adapter"]) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    tampered = subprocess.run(verify, capture_output=True, text=True, cwd=run["workdir"])
    assert tampered.returncode == 1
    assert f"artifact changed: {weights}" in tampered.stderr
