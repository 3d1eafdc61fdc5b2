"""A 2x1 learning-rate sweep through the committed compiled DAG (`medtune run`, kfp.local, tiny model).

Two train tasks run (the ParallelFor), each screened on half its steps (successive halving); `select` picks the
lower validation loss there, `finish` trains the winner's other half from its checkpoint, only the winner's
finished adapter reaches evaluate, MLflow holds a nested run per trial and the winner's finishing run, and the
audit record lists both trials with the winner marked and its finished adapter hash.
(Every other DAG test runs one trial, where `finish` passes the trial's result on.)
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from conftest import medtune_run, tiny_config_tree

pytestmark = pytest.mark.slow


def test_two_trial_sweep_evaluates_only_the_lower_validation_loss(tiny_model_dir, tmp_path):
    tree = tiny_config_tree(tiny_model_dir)
    tree["train"].update(eval_steps=2)  # a validation loss for every trial
    tree["sweep"] = {"grid": {"learning_rate": [3e-3, 1e-6]}, "screen_fraction": 0.5}
    tree["gate"] = {"rules": [{"metric": "empty_rate", "max": 1.0}]}
    with medtune_run(tree, tmp_path) as (_, uri, summary, console):
        tasks = Path(summary["decision"]).parents[1]
        outcomes = [json.loads(p.read_text()) for p in sorted(tasks.glob("for-loop-*-iteration-*/train/outcome"))]
        assert [o["trial"] for o in outcomes] == [{"learning_rate": 3e-3}, {"learning_rate": 1e-6}]
        assert [o["screened"] for o in outcomes] == [{"at_step": 2, "of_steps": 4}] * 2
        assert [o["metrics"]["steps"] for o in outcomes] == [2, 2]
        losses = {o["index"]: o["metrics"]["eval_loss"] for o in outcomes}
        winner = min(losses, key=losses.get)
        assert losses[0] != losses[1]

        table = json.loads((tasks / "finish" / "trials").read_text())
        assert table["winner"] == winner and [t["winner"] for t in table["trials"]] == [i == winner for i in (0, 1)]
        assert summary["trials"]["winner"] == winner
        done = table["trials"][winner]["finished"]
        assert done["metrics"]["steps"] == 4 and done["metrics"]["resumed_from_step"] == 2
        assert f"eval_loss {losses[winner]:.4f} at step 2 of 4 (winner; finished: eval_loss " \
               f"{done['metrics']['eval_loss']:.4f} at step 4)" in console
        # The adapter evaluate read (passed on by finish and the preference step) is the winner's finished one;
        # neither trial's screened adapter is.
        from medtune.lineage import hash_files, tree_digest

        evaluated = tree_digest(hash_files(tasks / "preference" / "adapter"))
        assert evaluated == done["adapter_sha256"]
        assert evaluated not in {o["adapter_sha256"] for o in outcomes}
        assert outcomes[0]["adapter_sha256"] != outcomes[1]["adapter_sha256"]
        history = json.loads((tasks / "finish" / "history").read_text())
        assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4], "the screen's steps and the rest"

        record = json.loads(Path(summary["lineage"]).read_text())
        assert [(t["index"], t["winner"], t["adapter_sha256"]) for t in record["trials"]["trials"]] == [
            (o["index"], o["index"] == winner, o["adapter_sha256"]) for o in outcomes]
        assert record["trials"]["trials"][winner]["finished"]["adapter_sha256"] == evaluated

        client = mlflow.MlflowClient(uri)
        children = client.search_runs([client.get_run(summary["run_id"]).info.experiment_id],
                                      filter_string=f"tags.mlflow.parentRunId = '{summary['run_id']}'")
        trials = {c.data.tags["mlflow.runName"]: c for c in children if "medtune.trial" in c.data.tags}
        assert sorted(trials) == ["finish trial " + str(winner), "train trial 0", "train trial 1"]
        for index, run in enumerate(trials[f"train trial {i}"] for i in (0, 1)):
            assert float(run.data.params["train.learning_rate"]) == [3e-3, 1e-6][index]
            assert run.data.metrics["eval_loss"] == pytest.approx(losses[index])
            assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]  # the screen
        rest = trials[f"finish trial {winner}"]
        assert [m.step for m in client.get_metric_history(rest.info.run_id, "loss")] == [3, 4]
        parent = client.get_run(summary["run_id"]).data.metrics
        assert parent["train.eval_loss"] == pytest.approx(done["metrics"]["eval_loss"])
        assert parent["train.sweep_trial"] == winner and parent["train.steps"] == 4
        report = Path(summary["report"]).read_text()
        assert "Sweep: 2 trials" in report and report.count("<img") >= 2
