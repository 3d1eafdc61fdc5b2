"""The promotion gate: every rule is checked and reported, passed or failed.

A metric that is missing or not a number fails its rule; a gate that cannot measure must not pass.
"""

from __future__ import annotations

import math

from medtune.config import GateConfig


def _check(name: str, value: float | None, bound: float) -> dict:
    measurable = value is not None and math.isfinite(value)
    return {
        "rule": name,
        "value": value if measurable else None,
        "bound": bound,
        "passed": bool(measurable and value >= bound),
        "reason": "" if measurable else "metric missing or not a number",
    }


def decide(policy: GateConfig, comparison: dict) -> dict:
    base, candidate = comparison.get("base", {}), comparison.get("candidate", {})
    checks = []
    for rule in policy.rules:
        value = candidate.get(rule.metric)
        if rule.min is not None:
            checks.append(_check(f"{rule.metric} >= {rule.min}", value, rule.min))
        if rule.min_improvement is not None:
            before = base.get(rule.metric)
            delta = value - before if value is not None and before is not None else None
            checks.append(_check(f"{rule.metric} - base >= {rule.min_improvement}", delta, rule.min_improvement))
    passed = all(c["passed"] for c in checks)
    failed = [c["rule"] for c in checks if not c["passed"]]
    summary = "all rules passed" if passed else "failed: " + ", ".join(failed)
    return {"passed": passed, "summary": summary, "checks": checks}
