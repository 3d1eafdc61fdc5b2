"""The promotion gate: every bound of every rule is one check, listed with its value, bound and verdict.

The rules are the profile's `gate.rules` (on the run's own test split) and each `eval.suites[].rules`
(on that suite). Checks, per rule, against the set the rule reads:

* min / max: the candidate's value against a floor / ceiling (ceilings suit the quality checks).
* min_improvement: improvement over the base model, in the metric's better direction.
* significant: the paired bootstrap CI of that improvement excludes zero on the better side.
* non_inferior: the CI bound of candidate - base on the worse side stays above -margin ("not
  significantly worse by more than the margin"); the same against the champion when one is registered.
* max_regression: how much worse than the champion the candidate may be. Not applicable (and not
  blocking) when no model version carries the `champion` alias; a champion that exists but whose
  metric is missing fails the check like any other missing value.

And per decision: every set a rule reads must have at least `gate.min_questions` scored questions, and at
least one check must compare the candidate with the base model (a policy of floors alone, or one whose
every comparison was skipped, cannot promote). A metric that is missing or not a finite number fails its
check: a gate that cannot measure must not pass. A rejected candidate is a decision, not an error. When a
preference stage made the candidate, the decision also says what the same policy makes of the SFT-only
result (`sft_only`); only the candidate's verdict counts.
"""

from __future__ import annotations

import os

from medtune.config import Config, GateRule
from medtune.metric_catalog import PRIMARY, sign
from medtune.numeric import finite as number

PASS, FAIL, NOT_APPLICABLE = "PASS", "FAIL", "N/A"
OWN_SPLIT = "test"
# The checks that compare the candidate with the base model; a decision needs one that applied.
VS_BASE = ("min_improvement", "significant", "non_inferior")
_OPS = {">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b, ">": lambda v, b: v > b, "<": lambda v, b: v < b}


class PolicyMismatch(RuntimeError):
    """The run's policy is not the one the pipeline was compiled with."""


def on_cluster() -> bool:
    """A task pod of Kubeflow Pipelines (its launcher sets KFP_POD_NAME); kfp.local and direct calls are not."""
    return bool(os.environ.get("KFP_POD_NAME"))


def check_policy(cfg: Config, compiled_sha256: str, enforce: bool | None = None) -> None:
    """On a cluster the policy's hash is a constant of the compiled pipeline (pipeline.build puts the
    profile's `policy_digest()` into the gate task): a run parameter that changes any part of the policy, to
    loosen it or otherwise, stops the gate instead of deciding under it. Locally (kfp.local, where the
    pipeline is the committed cluster IR run with the local profile) the user owns the policy anyway."""
    if not (on_cluster() if enforce is None else enforce):
        return
    if not compiled_sha256:
        raise PolicyMismatch("the pipeline carries no compiled policy hash: recompile it with `medtune compile`")
    if cfg.policy_digest() != compiled_sha256:
        raise PolicyMismatch(f"the run's gate policy (sha256 {cfg.policy_digest()[:12]}) differs from the one "
                             f"compiled into the pipeline ({compiled_sha256[:12]}): change the profile and "
                             "recompile; a run parameter cannot change the policy")


def _check(metric: str, kind: str, text: str, value, op: str, bound: float, missing: str = "",
           suite: str = OWN_SPLIT) -> dict:
    value = number(value)
    ok = value is not None and _OPS[op](value, bound)
    reason = "" if value is not None else missing or "metric missing or not a number"
    return {"suite": suite, "rule": text, "metric": metric, "check": kind, "value": value, "op": op,
            "bound": bound, "passed": ok, "verdict": PASS if ok else FAIL, "reason": reason}


def _not_applicable(metric: str, kind: str, text: str, op: str, bound: float, reason: str, suite: str) -> dict:
    return {"suite": suite, "rule": text, "metric": metric, "check": kind, "value": None, "op": op,
            "bound": bound, "passed": True, "verdict": NOT_APPLICABLE, "reason": reason}


def _improvement(metric: str, better, worse) -> float | None:
    """How much `better` improves on `worse`, in the metric's better direction (None if unmeasurable)."""
    a, b = number(better), number(worse)
    return None if a is None or b is None else sign(metric) * (a - b)


def _worse_bound(metric: str, interval: dict | None) -> float | None:
    """The CI bound of candidate - other on the candidate's worse side, turned so that > 0 means better.

    Above 0: significantly better; above -margin: not worse by more than the margin (non-inferior).
    """
    edge = number((interval or {}).get("low" if sign(metric) > 0 else "high"))
    return None if edge is None else sign(metric) * edge


def rule_checks(rule: GateRule, scored: dict, suite: str) -> list[dict]:
    m = rule.metric
    base, candidate, champion = scored.get("base"), scored.get("candidate"), scored.get("champion")
    champion_info = scored.get("champion_info") or {}
    ci = scored.get("ci") or {}
    # No candidate, no interval: every check of a missing candidate fails.
    vs_base = (ci.get("candidate_vs_base") or {}) if candidate is not None else {}
    vs_champion = ci.get("candidate_vs_champion") or {}
    value = (candidate or {}).get(m)
    better = "lower" if sign(m) < 0 else "higher"
    no_champion = champion is None and candidate is not None
    why_no_champion = champion_info.get("reason") or "no champion registered"
    level = (vs_base.get(m) or {}).get("confidence", scored.get("bootstrap", {}).get("confidence", 0.95))
    checks = []

    def add(kind, text, val, op, bound, missing=""):
        checks.append(_check(m, kind, text, val, op, bound, missing, suite))

    if rule.min is not None:
        add("min", f"{m} >= {rule.min}", value, ">=", rule.min)
    if rule.max is not None:
        add("max", f"{m} <= {rule.max}", value, "<=", rule.max)
    if rule.min_improvement is not None:
        add("min_improvement", f"{m} improvement over base ({better} is better) >= {rule.min_improvement}",
            _improvement(m, value, (base or {}).get(m)), ">=", rule.min_improvement)
    if rule.significant:
        add("significant", f"{m} improvement over base significant ({level:.0%} CI excludes zero)",
            _worse_bound(m, vs_base.get(m)), ">", 0.0, "no confidence interval for candidate vs base")
    if rule.non_inferior is not None:
        margin = rule.non_inferior
        add("non_inferior", f"{m} not worse than base by more than {margin} ({level:.0%} CI bound of "
            "candidate - base)", _worse_bound(m, vs_base.get(m)), ">", -margin,
            "no confidence interval for candidate vs base")
        text = f"{m} not worse than champion by more than {margin} ({level:.0%} CI bound of candidate - champion)"
        if no_champion:
            checks.append(_not_applicable(m, "non_inferior_champion", text, ">", -margin, why_no_champion, suite))
        else:
            add("non_inferior_champion", text, _worse_bound(m, vs_champion.get(m)), ">", -margin,
                "no confidence interval for candidate vs champion")
    if rule.max_regression is not None:
        text = f"{m} regression vs champion ({better} is better) <= {rule.max_regression}"
        if no_champion:
            checks.append(_not_applicable(m, "max_regression", text, "<=", rule.max_regression, why_no_champion,
                                          suite))
        else:
            add("max_regression", text, _improvement(m, (champion or {}).get(m), value), "<=", rule.max_regression)
    return checks


def decide(cfg: Config, comparison: dict) -> dict:
    """Apply the policy of `cfg` (gate.rules, suite rules, gate.min_questions) to an evaluation's comparison."""
    rules = cfg.policy_rules()
    suites = comparison.get("suites") or {}
    checks = []
    for suite in dict.fromkeys(rule.suite or OWN_SPLIT for rule in rules):
        scored = comparison if suite == OWN_SPLIT else suites.get(suite)
        if scored is None:
            checks.append(_check("n", "scored", f"suite {suite} scored", None, ">=", 1, f"suite {suite} was not "
                                 "scored", suite))
            continue
        checks.append(_check("n", "min_questions", f"{suite}: questions scored >= {cfg.gate.min_questions}",
                             scored.get("n"), ">=", cfg.gate.min_questions, suite=suite))
        for rule in rules:
            if (rule.suite or OWN_SPLIT) == suite:
                checks += rule_checks(rule, scored, suite)
    if not any(c["check"] in VS_BASE and c["verdict"] != NOT_APPLICABLE for c in checks):
        checks.append(_check("-", "vs_base", "at least one check compares the candidate with the base model",
                             None, ">=", 1, "the policy has no applicable check against the base model"))
    passed = bool(checks) and all(c["passed"] for c in checks)
    failed = [f"[{c['suite']}] {c['rule']} (got {_fmt(c['value'])}{'; ' + c['reason'] if c['reason'] else ''})"
              for c in checks if c["verdict"] == FAIL]
    skipped = [c for c in checks if c["verdict"] == NOT_APPLICABLE]
    if passed:
        summary = f"all {len(checks) - len(skipped)} checks passed"
        if skipped:
            summary += f"; {len(skipped)} not applicable ({skipped[0]['reason']})"
    else:
        summary = "failed: " + "; ".join(failed)
    champion_info = comparison.get("champion_info") or None
    decision = {"passed": passed, "summary": summary, "checks": checks, "promote": bool(passed and cfg.gate.promote),
                "policy": cfg.policy(), "policy_sha256": cfg.policy_digest(), "champion": champion_info,
                "headline": headline(comparison)}
    if comparison.get("sft") is not None:
        sft_only = decide(cfg, as_candidate(comparison, "sft"))
        decision["sft_only"] = {"passed": sft_only["passed"], "summary": sft_only["summary"]}
    return decision


def as_candidate(comparison: dict, model: str) -> dict:
    """The comparison with `model` (the SFT-only result) in the candidate's place, on the split and every suite."""
    def swap(scored: dict) -> dict:
        ci = scored.get("ci") or {}
        rest = {k: v for k, v in scored.items() if k not in (model, "suites")}
        return {**rest, "candidate": scored.get(model),
                "ci": {"candidate_vs_base": ci.get(f"{model}_vs_base"),
                       "candidate_vs_champion": ci.get(f"{model}_vs_champion")}}

    return {**swap(comparison), "suites": {name: swap(s) for name, s in (comparison.get("suites") or {}).items()}}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def headline(comparison: dict) -> list[str]:
    """Plain sentences per scored set: did the candidate beat the base model on the primary metrics?"""
    if comparison.get("candidate") is None:
        return ["No candidate was scored; only the base model's metrics are reported."]
    sentences = _set_headline(comparison, "")
    for name, scored in (comparison.get("suites") or {}).items():
        sentences += _set_headline(scored, f"[{name}] ")
    return sentences


def _set_headline(comparison: dict, prefix: str) -> list[str]:
    ci = (comparison.get("ci") or {}).get("candidate_vs_base") or {}
    sentences = []
    for m in PRIMARY.get(comparison.get("kind", "free_text"), ()):
        interval = ci.get(m)
        if not interval or interval.get("low") is None:
            sentences.append(f"{prefix}{m}: no confidence interval could be computed, so the candidate did NOT "
                             "demonstrably beat the base model.")
            continue
        level = f"{interval['confidence']:.0%} CI"
        span = f"{interval['delta']:+.4f}, {level} [{interval['low']:+.4f}, {interval['high']:+.4f}], " \
               f"n={interval['n']}"
        if interval["low"] > 0:
            sentences.append(f"{prefix}{m}: the candidate beat the base model ({span}); the CI excludes zero.")
        elif interval["high"] < 0:
            sentences.append(f"{prefix}{m}: the candidate did NOT beat the base model: it is significantly worse "
                             f"({span}).")
        else:
            sentences.append(f"{prefix}{m}: the candidate did NOT beat the base model with a CI excluding zero "
                             f"({span}).")
    return sentences
