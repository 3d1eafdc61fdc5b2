"""The gate on the real compiled DAG (kfp.local) with the SHIPPED policy: harmful training data is blocked.

The candidate is fine-tuned on answers shuffled across questions (every answer belongs to another
question). Nothing in the policy is changed: gate rules, suites (MMLU medical and K-QA slices), minimum
questions, confidence and eval.max_rows are those of configs/local.yaml. To keep the test within minutes it
trains the tiny random model for a few steps; only training length and generation length (neither is part
of the policy, see Config.policy) are shortened. The default run on the real model
(tests/test_pipeline_local.py) takes whichever branch the same policy decides and checks that branch.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from medtune import config as config_mod

pytestmark = pytest.mark.slow

MEDTUNE = Path(sys.executable).parent / "medtune"
SHIPPED = ROOT / "configs" / "local.yaml"


def _shuffled(source: Path, target: Path, seed: int = 7) -> Path:
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    answers = [r["answer"] for r in rows]
    random.Random(seed).shuffle(answers)
    # a derangement: no row keeps its own answer
    answers = answers[1:] + answers[:1] if any(a == r["answer"] for a, r in zip(answers, rows)) else answers
    target.write_text("".join(json.dumps({**r, "answer": a}) + "\n" for r, a in zip(rows, answers)))
    return target


def test_harmful_fine_tune_is_blocked_by_the_shipped_policy(tiny_model_dir, tmp_path):
    shipped = config_mod.load(SHIPPED)
    data = _shuffled(ROOT / shipped.data.path, tmp_path / "shuffled.jsonl")
    overrides = {"data.path": str(data), "model.id": str(tiny_model_dir), "model.source": "path",
                 "train.max_steps": 6, "train.logging_steps": 2, "eval.max_new_tokens": 12,
                 "tracking.registered_model": "medtune-harmful"}
    args = [str(MEDTUNE), "run", "--config", str(SHIPPED), "--json", "--output-dir", str(tmp_path / "runs" / "bad")]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    assert config_mod.load(SHIPPED, [f"{k}={v}" for k, v in overrides.items()]).policy_digest() == \
        shipped.policy_digest(), "the test runs under the shipped policy"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = json.loads(proc.stdout.strip().splitlines()[-1])

    assert run["gate"]["passed"] is False
    artifacts = Path(run["output_dir"]) / "artifacts"
    assert not list(artifacts.glob("*/register")) and not list(artifacts.glob("*/push")), \
        "register and push are inside dsl.If(gate passed)"
    decision = json.loads(Path(run["decision"]).read_text())
    assert decision["policy_sha256"] == shipped.policy_digest()
    failed = {(c["suite"], c["check"]) for c in decision["checks"] if c["verdict"] == "FAIL"}
    assert ("test", "significant") in failed, "no significant improvement on its own split"
    assert {c["suite"] for c in decision["checks"]} == {"test", "mmlu_medical", "kqa"}, "every suite was scored"

    [audit] = artifacts.glob("*/audit-2/lineage")
    record = json.loads(audit.read_text())
    assert record["gate"]["passed"] is False
    assert record["gate"]["summary"].startswith("failed: ") and "improvement over base" in record["gate"]["summary"]
    assert record["mlflow"]["model_version"] is None
