"""train.method full end to end: the committed compiled DAG run by `medtune run` (kfp.local) on the tiny model.

The trained output is a whole model directory (no adapter), and every consumer loads it as one: evaluate
(candidate, and champion once it is registered), the registered pyfunc and `medtune ask`. The tiny model
is random, so its answers score nothing: the gate policy here asks only that the full fine-tune lowers the
test split's perplexity against the base model (a decision needs a check against base, on at least
`gate.min_questions` questions); that is enough to take the `dsl.If(gate passed)` branch this test is
about (tests/test_gate.py and tests/test_gate_dag.py cover the shipped policy).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from typer.testing import CliRunner

from conftest import medtune_run, tiny_config_tree
from medtune import config as config_mod
from medtune import models, rows

pytestmark = pytest.mark.slow

QUESTION = "What is high blood pressure?"


def test_full_fine_tune_is_evaluated_gated_registered_and_answers(tiny_model_dir, tmp_path, monkeypatch):
    tree = tiny_config_tree(tiny_model_dir)
    tree["train"].update(method="full", learning_rate=1e-3)
    tree["eval"]["max_rows"] = None  # the whole test split: 30+ questions, the policy's minimum
    tree["gate"] = {"rules": [{"metric": "perplexity", "min_improvement": 0.0}], "promote": True}
    tree["tracking"]["registered_model"] = "medtune-full-it"
    with medtune_run(tree, tmp_path) as (profile, uri, summary, _):
        assert summary["gate"]["passed"] is True and summary["model_version"] == "medtune-full-it/1"

        trained = Path(summary["adapter"])
        assert (trained / "model.safetensors").exists() and not models.is_adapter_dir(trained)
        comparison = json.loads(next((tmp_path / "run" / "artifacts").glob("*/evaluate/comparison")).read_text())
        assert comparison["candidate"]["perplexity"] != comparison["base"]["perplexity"], "its own weights"

        cfg = config_mod.load(profile, [f"tracking.tracking_uri={uri}"])
        direct = _answer(models.load_trained(cfg.model, cfg.train, trained), cfg)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # undone after the test: later ones must not find it stopped
        mlflow.set_tracking_uri(uri)
        registered = mlflow.pyfunc.load_model("models:/medtune-full-it/1")
        assert registered.predict(pd.DataFrame({"question": [QUESTION]})) == [direct]

        # The registered full model is now the champion: evaluate downloads it and scores it as the candidate.
        from medtune.steps import evaluate

        test_dir = next((tmp_path / "run" / "artifacts").glob("*/preprocess/test_split"))
        again = evaluate.score(cfg, rows.read(test_dir), trained, tmp_path / "comparison.json", tmp_path / "pred")
        assert again["champion_info"]["version"] == "1"
        assert again["champion"] == again["candidate"]

    from medtune.cli import app

    asked = CliRunner().invoke(app, ["ask", QUESTION, "--adapter", str(trained), "--config", str(profile)])
    assert asked.exit_code == 0, asked.output
    assert asked.stdout.strip().splitlines()[-1] == direct


def _answer(model, cfg) -> str:
    from medtune.evaluate import generate
    from medtune.preprocess import render_prompt

    tokenizer = models.load_tokenizer(cfg.model, padding_side="left")
    prompt = render_prompt(tokenizer, cfg.preprocess.system_prompt, QUESTION)
    return generate(model, tokenizer, [prompt], batch_size=1, max_new_tokens=cfg.eval.max_new_tokens, desc="ask",
                    decoding=cfg.decoding)[0]
