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
    assert trials_step.run(load().to_json()) == [{"index": 0, "overrides": {}}]


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
