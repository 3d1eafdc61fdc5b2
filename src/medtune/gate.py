"""The promotion gate: every bound of every rule is one check, listed with its value, bound and verdict.

Checks, per rule of the policy (`gate:` in the profile, versioned and logged with the run):

* min / max: the candidate's value against a floor / ceiling (ceilings suit the quality checks).
* min_improvement: improvement over the base model, in the metric's better direction.
* significant: the paired bootstrap CI of that improvement excludes zero on the better side.
* max_regression: how much worse than the champion the candidate may be. Not applicable (and not
  blocking) when no model version carries the `champion` alias; a champion that exists but whose
  metric is missing fails the check like any other missing value.

A metric that is missing or not a finite number fails its check: a gate that cannot measure must not
pass. A rejected candidate is a decision, not an error: the caller records it and carries on.
"""

from __future__ import annotations

import math

from medtune.config import LOWER_IS_BETTER, GateConfig

PASS, FAIL, NOT_APPLICABLE = "PASS", "FAIL", "N/A"
_OPS = {">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b, ">": lambda v, b: v > b, "<": lambda v, b: v < b}


def direction(metric: str) -> int:
    return -1 if metric in LOWER_IS_BETTER else 1


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _check(metric: str, kind: str, text: str, value, op: str, bound: float, missing: str = "") -> dict:
    value = _number(value)
    if value is None:
        return {"rule": text, "metric": metric, "check": kind, "value": None, "op": op, "bound": bound,
                "passed": False, "verdict": FAIL, "reason": missing or "metric missing or not a number"}
    ok = _OPS[op](value, bound)
    return {"rule": text, "metric": metric, "check": kind, "value": value, "op": op, "bound": bound,
            "passed": ok, "verdict": PASS if ok else FAIL, "reason": ""}


def _not_applicable(metric: str, kind: str, text: str, op: str, bound: float, reason: str) -> dict:
    return {"rule": text, "metric": metric, "check": kind, "value": None, "op": op, "bound": bound,
            "passed": True, "verdict": NOT_APPLICABLE, "reason": reason}


def _get(scores: dict | None, metric: str):
    return None if scores is None else scores.get(metric)


def _improvement(metric: str, better, worse) -> float | None:
    """How much `better` improves on `worse`, in the metric's better direction (None if unmeasurable)."""
    a, b = _number(better), _number(worse)
    return None if a is None or b is None else direction(metric) * (a - b)


def decide(policy: GateConfig, comparison: dict) -> dict:
    base, candidate = comparison.get("base"), comparison.get("candidate")
    champion = comparison.get("champion")
    champion_info = comparison.get("champion_info") or {}
    # No candidate, no interval: every check of a missing candidate fails.
    ci = ((comparison.get("ci") or {}).get("candidate_vs_base") or {}) if candidate is not None else {}
    checks = []
    for rule in policy.rules:
        m = rule.metric
        value = _get(candidate, m)
        if rule.min is not None:
            checks.append(_check(m, "min", f"{m} >= {rule.min}", value, ">=", rule.min))
        if rule.max is not None:
            checks.append(_check(m, "max", f"{m} <= {rule.max}", value, "<=", rule.max))
        better = "lower" if direction(m) < 0 else "higher"
        if rule.min_improvement is not None:
            checks.append(_check(m, "min_improvement", f"{m} improvement over base ({better} is better) >= "
                                 f"{rule.min_improvement}", _improvement(m, value, _get(base, m)), ">=",
                                 rule.min_improvement))
        if rule.significant:
            interval = ci.get(m) or {}
            # The bound of the CI nearest zero, turned so that > 0 means "significantly better".
            edge = interval.get("low") if direction(m) > 0 else interval.get("high")
            edge = None if _number(edge) is None else direction(m) * edge
            level = interval.get("confidence", 0.95)
            checks.append(_check(m, "significant", f"{m} improvement over base significant ({level:.0%} CI "
                                 "excludes zero)", edge, ">", 0.0, missing="no confidence interval for "
                                 "candidate vs base"))
        if rule.max_regression is not None:
            text = f"{m} regression vs champion ({better} is better) <= {rule.max_regression}"
            if champion is None and candidate is not None:
                checks.append(_not_applicable(m, "max_regression", text, "<=", rule.max_regression,
                                              champion_info.get("reason") or "no champion registered"))
            else:
                regression = _improvement(m, _get(champion, m), value)
                checks.append(_check(m, "max_regression", text, regression, "<=", rule.max_regression))
    passed = bool(checks) and all(c["passed"] for c in checks)
    failed = [f"{c['rule']} (got {_fmt(c['value'])}{'; ' + c['reason'] if c['reason'] else ''})"
              for c in checks if c["verdict"] == FAIL]
    skipped = [c for c in checks if c["verdict"] == NOT_APPLICABLE]
    if passed:
        summary = f"all {len(checks) - len(skipped)} checks passed"
        if skipped:
            summary += f"; {len(skipped)} not applicable ({skipped[0]['reason']})"
    else:
        summary = "failed: " + "; ".join(failed)
    return {"passed": passed, "summary": summary, "checks": checks, "promote": bool(passed and policy.promote),
            "policy": policy.model_dump(mode="json"), "champion": champion_info or None,
            "headline": headline(comparison)}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def headline(comparison: dict) -> list[str]:
    """Plain sentences: did the candidate beat the base model on the primary metrics, CI excluding zero?"""
    from medtune.metrics import PRIMARY

    ci = (comparison.get("ci") or {}).get("candidate_vs_base") or {}
    if comparison.get("candidate") is None:
        return ["No candidate was scored; only the base model's metrics are reported."]
    sentences = []
    for m in PRIMARY.get(comparison.get("kind", "free_text"), ()):
        interval = ci.get(m)
        if not interval or interval.get("low") is None:
            sentences.append(f"{m}: no confidence interval could be computed, so the candidate did NOT "
                             "demonstrably beat the base model.")
            continue
        level = f"{interval['confidence']:.0%} CI"
        span = f"{interval['delta']:+.4f}, {level} [{interval['low']:+.4f}, {interval['high']:+.4f}], " \
               f"n={interval['n']}"
        if interval["low"] > 0:
            sentences.append(f"{m}: the candidate beat the base model ({span}); the CI excludes zero.")
        elif interval["high"] < 0:
            sentences.append(f"{m}: the candidate did NOT beat the base model: it is significantly worse ({span}).")
        else:
            sentences.append(f"{m}: the candidate did NOT beat the base model with a CI excluding zero ({span}).")
    return sentences
