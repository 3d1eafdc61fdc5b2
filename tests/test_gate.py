"""The gate's decision matrix: passes, fails each kind of rule, NaN and missing metrics, champions."""

from __future__ import annotations

import copy

import pytest

from medtune import config as config_mod
from medtune.config import GateConfig
from medtune.gate import PolicyMismatch, check_policy, decide


def policy(gate: dict, suites: list[dict] = (), **eval_fields) -> config_mod.Config:
    """A whole config around a gate section (the policy also reads eval.suites and eval settings)."""
    return config_mod.from_dict({"name": "t", "data": {"path": "x.jsonl"}, "model": {"id": "m"}, "gate": gate,
                                 "eval": {"suites": list(suites), **eval_fields}})


def ci(delta, low, high):
    return {"delta": delta, "low": low, "high": high, "significant": low > 0 or high < 0, "n": 34,
            "samples": 1000, "confidence": 0.95}


BASE = {"rougeL": 0.20, "token_f1": 0.22, "empty_rate": 0.0, "perplexity": 12.0}
CANDIDATE = {"rougeL": 0.30, "token_f1": 0.31, "empty_rate": 0.03, "perplexity": 9.0}
CHAMPION = {"rougeL": 0.29, "token_f1": 0.30, "empty_rate": 0.0, "perplexity": 9.5}


def comparison(candidate=None, base=None, champion=None, cis=None):
    return {
        "kind": "free_text", "n": 34,
        "base": copy.deepcopy(base or BASE),
        "candidate": copy.deepcopy(candidate or CANDIDATE),
        "champion": champion,
        "champion_info": {"available": champion is not None, "version": "3" if champion is not None else None,
                          "reason": "" if champion is not None else "no version of m has alias 'champion'"},
        "ci": {"candidate_vs_base": cis if cis is not None else {
            "rougeL": ci(0.10, 0.06, 0.14), "token_f1": ci(0.09, 0.05, 0.13), "perplexity": ci(-3.0, -4.0, -2.0)}},
    }


POLICY = policy({"rules": [
    {"metric": "rougeL", "min": 0.25, "min_improvement": 0.05, "significant": True, "max_regression": 0.02},
    {"metric": "token_f1", "min": 0.25, "min_improvement": 0.05, "significant": True},
    {"metric": "empty_rate", "max": 0.05},
    {"metric": "perplexity", "max": 20, "min_improvement": 1.0, "significant": True},
], "promote": True})


def check(decision, metric, kind):
    return next(c for c in decision["checks"] if c["metric"] == metric and c["check"] == kind)


def test_passes_and_lists_every_rule_with_value_bound_and_verdict():
    d = decide(POLICY, comparison(champion=CHAMPION))
    assert d["passed"] is True and d["promote"] is True
    assert len(d["checks"]) == 12  # questions scored >= 30, then 4 + 3 + 1 + 3 bounds across the four rules
    assert check(d, "n", "min_questions")["value"] == 34
    assert all(c["verdict"] == "PASS" for c in d["checks"])
    assert check(d, "rougeL", "min_improvement")["value"] == pytest.approx(0.10)
    assert check(d, "rougeL", "max_regression")["value"] == pytest.approx(-0.01)  # champion 0.29 -> 0.30
    # perplexity is lower-is-better: improvement = 12 - 9 = 3; significance uses the CI's high end (-2 -> 2)
    assert check(d, "perplexity", "min_improvement")["value"] == pytest.approx(3.0)
    assert check(d, "perplexity", "significant")["value"] == pytest.approx(2.0)
    assert check(d, "empty_rate", "max")["bound"] == 0.05 and check(d, "empty_rate", "max")["op"] == "<="
    assert d["summary"] == "all 12 checks passed"
    assert d["policy"]["gate"]["promote"] is True and len(d["policy_sha256"]) == 64


@pytest.mark.parametrize("change, metric, kind", [
    # floor only: base and champion lowered so the improvement (0.14) and regression (0) still pass
    (lambda c: (c["candidate"].update(rougeL=0.24), c["base"].update(rougeL=0.10), c["champion"].update(rougeL=0.24)),
     "rougeL", "min"),
    (lambda c: c["candidate"].update(empty_rate=0.2), "empty_rate", "max"),                # ceiling
    (lambda c: c["base"].update(token_f1=0.29), "token_f1", "min_improvement"),            # +0.02 < 0.05
    (lambda c: c["ci"]["candidate_vs_base"].update(rougeL=ci(0.10, -0.01, 0.2)), "rougeL", "significant"),
    (lambda c: c["candidate"].update(perplexity=11.5), "perplexity", "min_improvement"),   # 12 -> 11.5
    (lambda c: c["champion"].update(rougeL=0.40), "rougeL", "max_regression"),             # champion better
])
def test_each_rule_fails_on_its_own(change, metric, kind):
    comp = comparison(champion=dict(CHAMPION))
    change(comp)
    d = decide(POLICY, comp)
    assert d["passed"] is False and d["promote"] is False
    failed = [(c["metric"], c["check"]) for c in d["checks"] if c["verdict"] == "FAIL"]
    assert failed == [(metric, kind)]
    assert d["summary"].startswith("failed: ") and metric in d["summary"]


def test_champion_better_by_exactly_the_allowance_passes_and_beyond_fails():
    ok = decide(POLICY, comparison(champion={**CHAMPION, "rougeL": 0.32}))   # regression 0.02 <= 0.02
    assert check(ok, "rougeL", "max_regression")["value"] == pytest.approx(0.02, abs=1e-12)
    bad = decide(POLICY, comparison(champion={**CHAMPION, "rougeL": 0.33}))
    assert check(bad, "rougeL", "max_regression")["verdict"] == "FAIL" and bad["passed"] is False


@pytest.mark.parametrize("value", [float("nan"), float("inf"), None, "0.3"])
def test_nan_or_non_numeric_metric_fails_never_passes(value):
    comp = comparison()
    comp["candidate"]["rougeL"] = value
    d = decide(POLICY, comp)
    assert d["passed"] is False
    for kind in ("min", "min_improvement"):
        c = check(d, "rougeL", kind)
        assert c["verdict"] == "FAIL" and c["value"] is None and "missing or not a number" in c["reason"]


def test_missing_metric_fails():
    comp = comparison()
    del comp["candidate"]["token_f1"]
    d = decide(POLICY, comp)
    assert not d["passed"] and check(d, "token_f1", "min")["verdict"] == "FAIL"


def test_missing_confidence_interval_fails_the_significance_check():
    d = decide(POLICY, comparison(cis={}))
    assert not d["passed"]
    assert check(d, "rougeL", "significant")["reason"] == "no confidence interval for candidate vs base"


def test_missing_candidate_fails_everything():
    comp = comparison()
    comp["candidate"] = None
    d = decide(POLICY, comp)
    assert not d["passed"]
    assert all(c["verdict"] == "FAIL" for c in d["checks"] if c["metric"] != "n")  # the count is of questions


def test_no_champion_makes_regression_rules_not_applicable_but_not_blocking():
    d = decide(POLICY, comparison(champion=None))
    c = check(d, "rougeL", "max_regression")
    assert c["verdict"] == "N/A" and "alias 'champion'" in c["reason"]
    assert d["passed"] is True
    assert "1 not applicable" in d["summary"]


def test_champion_that_could_not_be_scored_fails_the_regression_rule():
    comp = comparison(champion={})  # exists, but its metrics are missing
    d = decide(POLICY, comp)
    assert check(d, "rougeL", "max_regression")["verdict"] == "FAIL" and not d["passed"]


def test_promotion_only_when_the_policy_says_so():
    no_promote = POLICY.model_copy(update={"gate": POLICY.gate.model_copy(update={"promote": False})})
    d = decide(no_promote, comparison())
    assert d["passed"] is True and d["promote"] is False


def test_headline_says_plainly_when_the_candidate_did_not_beat_the_base():
    d = decide(POLICY, comparison(cis={"rougeL": ci(0.01, -0.02, 0.04), "token_f1": ci(0.09, 0.05, 0.13)}))
    rouge, f1, *_ = d["headline"]
    assert rouge.startswith("rougeL: the candidate did NOT beat the base model")
    assert f1.startswith("token_f1: the candidate beat the base model") and "excludes zero" in f1


def test_policy_validation_rejects_rules_without_bounds_and_unknown_metrics():
    with pytest.raises(ValueError, match="needs min, max"):
        GateConfig.model_validate({"rules": [{"metric": "rougeL"}]})
    with pytest.raises(ValueError):
        GateConfig.model_validate({"rules": [{"metric": "rogueL", "min": 0.1}]})
    with pytest.raises(ValueError, match="no better direction"):
        GateConfig.model_validate({"rules": [{"metric": "length_ratio", "min_improvement": 0.1}]})


def test_profiles_policies_load():
    for profile in ("local.yaml", "qwen2.5-0.5b-qlora.yaml"):
        cfg = config_mod.load(f"configs/{profile}")
        assert cfg.gate.rules


def test_too_few_questions_fail_the_set():
    comp = comparison()
    comp["n"] = 29
    d = decide(POLICY, comp)
    assert not d["passed"] and [c["check"] for c in d["checks"] if c["verdict"] == "FAIL"] == ["min_questions"]


def test_floors_alone_cannot_pass_a_decision_needs_a_check_against_base():
    floors = policy({"rules": [{"metric": "rougeL", "min": 0.1}, {"metric": "empty_rate", "max": 0.1}]})
    d = decide(floors, comparison())
    assert not d["passed"] and "no applicable check against the base model" in d["summary"]
    # champion-only comparisons that do not apply do not count either
    only_champion = policy({"rules": [{"metric": "rougeL", "max_regression": 0.1}]})
    d = decide(only_champion, comparison(champion=None))
    assert not d["passed"] and check(d, "-", "vs_base")["verdict"] == "FAIL"


SUITES = [{"name": "kqa", "path": "k.jsonl", "kind": "free_text",
           "rules": [{"metric": "rougeL", "non_inferior": 0.02}]}]


def _with_suite(delta, low, high, n=50, champion_ci=None):
    comp = comparison()
    comp["suites"] = {"kqa": {"kind": "free_text", "n": n, "base": {"rougeL": 0.2}, "candidate": {"rougeL": 0.2 + delta},
                              "champion": None if champion_ci is None else {"rougeL": 0.2},
                              "champion_info": {"reason": "no champion registered"},
                              "ci": {"candidate_vs_base": {"rougeL": ci(delta, low, high)},
                                     "candidate_vs_champion": {"rougeL": champion_ci} if champion_ci else None}}}
    return comp


@pytest.mark.parametrize("low, passed", [(-0.019, True), (-0.032, False)])
def test_suite_non_inferiority_uses_the_worse_side_of_the_ci(low, passed):
    cfg = policy(POLICY.gate.model_dump(), SUITES)
    d = decide(cfg, _with_suite(-0.005, low, 0.01))
    c = next(c for c in d["checks"] if c["suite"] == "kqa" and c["check"] == "non_inferior")
    assert c["value"] == pytest.approx(low) and c["bound"] == -0.02 and c["passed"] is passed
    assert d["passed"] is passed
    assert any(s.startswith("[kqa] rougeL") for s in d["headline"])


def test_suite_non_inferiority_also_against_the_champion_and_a_missing_suite_fails():
    cfg = policy(POLICY.gate.model_dump(), SUITES)
    d = decide(cfg, _with_suite(0.0, -0.01, 0.01, champion_ci=ci(-0.04, -0.06, -0.02)))
    c = next(c for c in d["checks"] if c["check"] == "non_inferior_champion")
    assert c["verdict"] == "FAIL" and c["value"] == pytest.approx(-0.06)
    d = decide(cfg, _with_suite(0.0, -0.01, 0.01, n=20))
    assert [c["check"] for c in d["checks"] if c["verdict"] == "FAIL"] == ["min_questions"]
    d = decide(cfg, comparison())
    assert not d["passed"] and "suite kqa was not scored" in d["summary"]


def test_policy_loads_refuse_loose_settings():
    with pytest.raises(config_mod.ConfigError, match="min_improvement"):
        policy({"rules": [{"metric": "rougeL", "min_improvement": -0.1}]})
    with pytest.raises(config_mod.ConfigError, match="confidence"):
        policy({"rules": [{"metric": "rougeL", "significant": True}]}, confidence=0.8)
    with pytest.raises(config_mod.ConfigError, match="lacks"):
        policy({"rules": [{"metric": "rougeL", "significant": True, "suite": "nope"}]})
    with pytest.raises(config_mod.ConfigError, match="closed_form metric accuracy"):
        policy({"rules": [{"metric": "rougeL", "significant": True}]},
               [{"name": "k", "path": "k.jsonl", "kind": "free_text", "rules": [{"metric": "accuracy", "min": 0.1}]}])


@pytest.mark.parametrize("override", ["gate.rules.0.min", "gate.min_questions", "gate.promote", "eval.max_rows",
                                      "eval.confidence", "eval.bootstrap_samples", "eval.compare_champion",
                                      "eval.suites", "decoding.repetition_penalty"])
def test_policy_hash_covers_everything_that_changes_the_decision(override):
    tree = {"name": "t", "data": {"path": "x.jsonl"}, "model": {"id": "m"},
            "gate": {"rules": [{"metric": "rougeL", "min": 0.1, "significant": True}]}, "eval": {}, "decoding": {}}
    before = config_mod.from_dict(tree).policy_digest()
    changed = {"gate.rules.0.min": 0.0, "gate.min_questions": 5, "gate.promote": True, "eval.max_rows": 10,
               "eval.confidence": 0.9, "eval.bootstrap_samples": 200, "eval.compare_champion": False,
               "eval.suites": SUITES, "decoding.repetition_penalty": 1.2}[override]
    section, key, *rest = override.split(".")
    if rest:
        tree[section][key][0][rest[1]] = changed
    else:
        tree[section][key] = changed
    after = config_mod.from_dict(tree)
    assert after.policy_digest() != before
    with pytest.raises(PolicyMismatch, match="cannot change the policy"):
        check_policy(after, before, enforce=True)
    check_policy(after, after.policy_digest(), enforce=True)
    check_policy(after, before, enforce=False)  # kfp.local: the local profile is the user's own policy


def test_the_compiled_pipeline_carries_the_cluster_policy_hash_as_a_constant():
    """Not a pipeline parameter: the gate task's policy_sha256 input is a literal in the committed IR."""
    import yaml

    from medtune.pipeline import CLUSTER_PROFILE, COMPILED

    ir = next(yaml.safe_load_all(COMPILED.read_text()))  # the IR; the second document is platform config
    gate_task = ir["root"]["dag"]["tasks"]["gate"]
    constant = gate_task["inputs"]["parameters"]["policy_sha256"]["runtimeValue"]["constant"]
    assert constant == config_mod.load(CLUSTER_PROFILE).policy_digest()
    assert "policy_sha256" not in ir["root"]["inputDefinitions"]["parameters"]
