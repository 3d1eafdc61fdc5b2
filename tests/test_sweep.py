"""Sweep expansion, per-trial validation at load time and the winner's selection (no training here)."""

import math

import pytest

from medtune import config, sweep
from medtune.steps import trials as trials_step

PROFILE = "configs/local.yaml"


def load(*overrides):
    return config.load(PROFILE, list(overrides))


def test_no_sweep_is_one_trial_with_the_config_as_it_is():
    assert load().trials() == [{}]
    assert trials_step.run(load().to_json(), "r1") == [{"index": 0, "overrides": {}, "run_id": "r1"}]


def test_grid_is_the_cartesian_product_with_nested_keys_from_set():
    cfg = load("sweep.grid.learning_rate=[3e-3,1e-6]", "sweep.grid.lora.r=[4,8]")
    assert cfg.trials() == [{"learning_rate": 3e-3, "lora.r": 4}, {"learning_rate": 3e-3, "lora.r": 8},
                            {"learning_rate": 1e-6, "lora.r": 4}, {"learning_rate": 1e-6, "lora.r": 8}]
    tree = sweep.apply(cfg.model_dump(mode="json"), cfg.trials()[1])
    assert tree["train"]["lora"]["r"] == 8 and tree["train"]["learning_rate"] == 3e-3


def test_random_samples_are_seeded_log_uniform_for_rates_and_integers_for_int_bounds():
    cfg = load("sweep.ranges.learning_rate=[1e-6,1e-2]", "sweep.ranges.lora.r=[4,32]", "sweep.trials=200",
               "sweep.seed=7")
    trials = cfg.trials()
    assert len(trials) == 200 and trials == load("sweep.ranges.learning_rate=[1e-6,1e-2]",
                                                 "sweep.ranges.lora.r=[4,32]", "sweep.trials=200",
                                                 "sweep.seed=7").trials()
    rates = [t["learning_rate"] for t in trials]
    assert all(1e-6 <= r <= 1e-2 for r in rates)
    # log-uniform: about half the samples lie below the geometric midpoint 1e-4 (uniform would put ~1% there)
    assert 0.35 < sum(r < 1e-4 for r in rates) / len(rates) < 0.65
    assert all(isinstance(t["lora.r"], int) and 4 <= t["lora.r"] <= 32 for t in trials)


@pytest.mark.parametrize("override, named", [
    ("sweep.grid.learning_rate=[1e-4,-1]", "train.learning_rate"),
    ("sweep.grid.lora.rank=[4]", "lora.rank"),
    ("sweep.grid.epochs=[]", "sweep.grid.epochs"),
])
def test_a_bad_trial_fails_at_load_naming_the_field(override, named):
    with pytest.raises(config.ConfigError, match=named.replace(".", r"\.")):
        load(override)


def test_ranges_need_trials():
    with pytest.raises(config.ConfigError, match="sweep.trials"):
        load("sweep.ranges.learning_rate=[1e-6,1e-2]")


def outcome(index, loss=None, status=sweep.OK, steps=10, r=8, reason=""):
    return {"index": index, "trial": {"learning_rate": 10.0 ** -index}, "status": status, "reason": reason,
            "lora_r": r, "metrics": {} if loss is None else {"eval_loss": loss, "steps": steps}}


def test_select_lowest_metric_and_failed_or_stopped_never_win():
    outcomes = [outcome(0, 2.0), outcome(1, 0.5, status=sweep.STOPPED, reason="lr_explosion"),
                outcome(2, 1.5), outcome(3, status=sweep.FAILED, reason="boom"), outcome(4, math.nan)]
    assert sweep.select(outcomes, "eval_loss")["index"] == 2
    assert sweep.select(outcomes, "eval_loss", lower_is_better=False)["index"] == 0


def test_ties_go_to_the_cheaper_trial():
    assert sweep.select([outcome(0, 1.0, steps=20), outcome(1, 1.0, steps=10)], "eval_loss")["index"] == 1
    assert sweep.select([outcome(0, 1.0, r=16), outcome(1, 1.0, r=4)], "eval_loss")["index"] == 1
    assert sweep.select([outcome(0, 1.0), outcome(1, 1.0)], "eval_loss")["index"] == 0


def test_all_failed_stops_with_every_reason():
    with pytest.raises(RuntimeError, match=r"trial 0 \(learning_rate=1\): failed: OOM.*trial 1 .*stopped: nan"):
        sweep.select([outcome(0, status=sweep.FAILED, reason="OOM"),
                      outcome(1, status=sweep.STOPPED, reason="nan")], "eval_loss")


def test_a_stopped_trial_is_recorded_not_raised_and_all_stopped_ends_the_run(tiny_model_dir, tmp_path):
    """A real learning-rate explosion (full fine-tune at lr 1.0, as in test_train) inside a 2-trial sweep."""
    import json

    import mlflow
    import pandas as pd

    from conftest import SAMPLE, open_sqlite_run, tiny_config_tree
    from medtune import models
    from medtune import preprocess as prep
    from medtune import train as trainer_mod
    from medtune.steps import select, train

    tree = tiny_config_tree(tiny_model_dir)
    tree["train"].update(method="full", max_steps=8, checkpoint_steps=0)
    tree["sweep"] = {"grid": {"learning_rate": [1e-3, 1.0]}}
    cfg_json, run_id = open_sqlite_run(tree, tmp_path, "sweep")
    cfg = config.from_json(cfg_json)
    splits = prep.prepare(pd.read_json(SAMPLE, orient="records", lines=True), models.load_tokenizer(cfg.model),
                          cfg.preprocess).splits
    for name in ("train", "validation"):
        (tmp_path / name).mkdir()
        splits[name].to_json(tmp_path / name / "rows.jsonl", orient="records", lines=True)
    out = tmp_path / "trial1"
    args = [str(tmp_path / "train"), str(tmp_path / "validation"), str(out / "adapter"), str(out / "history"),
            str(out / "work")]
    outcome = train.run(cfg_json, run_id, *args, trial={"index": 1, "overrides": {"learning_rate": 1.0}},
                        outcome_path=str(out / "outcome"))
    assert outcome["status"] == sweep.STOPPED and "Lower train.learning_rate (now 1)" in outcome["reason"]
    assert json.loads((out / "outcome").read_text()) == outcome and (out / "history").read_text() == "[]"
    client = mlflow.MlflowClient()
    (child,) = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")
    assert child.data.tags["mlflow.runName"] == "train trial 1" and child.data.tags["medtune.trial_status"] == "stopped"
    assert child.data.params["train.learning_rate"] == "1.0"

    with pytest.raises(RuntimeError, match=r"no trial .* trial 1 \(learning_rate=1\): stopped: TrainingFault"):
        select.run(cfg_json, run_id, [str(out / "outcome")], [str(out / "adapter")], [str(out / "history")],
                   str(tmp_path / "a"), str(tmp_path / "h"), str(tmp_path / "trials.json"))
    assert json.loads((tmp_path / "trials.json").read_text())["trials"][0]["status"] == "stopped"

    # Without a sweep the same fault is the step's failure, as before (a retry policy then applies).
    single = json.loads(cfg_json)
    single["sweep"] = {}
    single["train"]["learning_rate"] = 1.0
    with pytest.raises(trainer_mod.TrainingFault):
        train.run(json.dumps(single), run_id, *args)


def test_the_closing_note_and_report_show_where_a_screened_trial_was_measured():
    from medtune import report

    screened = {"at_step": 10, "of_steps": 20}
    table = {"metric": "eval_loss", "lower_is_better": True, "winner": 1, "trials": [
        {**outcome(0, 2.1234, steps=10), "screened": screened, "winner": False},
        {**outcome(1, 2.0, steps=10), "screened": screened, "winner": True,
         "finished": {"metrics": {"eval_loss": 1.9, "steps": 20}, "adapter_sha256": "ab"}}]}
    assert sweep.closing_note(table) == [
        "trial 0 (learning_rate=1): eval_loss 2.1234 at step 10 of 20",
        "trial 1 (learning_rate=0.1): eval_loss 2.0000 at step 10 of 20 (winner; finished: eval_loss 1.9000 at "
        "step 20)"]
    html = report.trials_section(table)
    assert html.count("10 of 20") == 2 and "winner; finished: eval_loss 1.9000 at step 20" in html
    unscreened = {**table, "trials": [{**outcome(0, 2.0), "winner": True}, {**outcome(1, 2.5), "winner": False}]}
    assert sweep.closing_note(unscreened) == ["trial 0 (learning_rate=1): eval_loss 2.0000 (winner)",
                                              "trial 1 (learning_rate=0.1): eval_loss 2.5000"]


def test_screen_fraction_is_a_fraction():
    assert load("sweep.screen_fraction=0.25").sweep.screen_fraction == 0.25
    for bad in ("0", "1.5", "-0.5"):
        with pytest.raises(config.ConfigError, match="sweep.screen_fraction"):
            load(f"sweep.screen_fraction={bad}")
