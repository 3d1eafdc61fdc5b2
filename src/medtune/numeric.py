"""Numbers as medtune reports them: a metric that is missing, NaN or infinite is "no value" (None)."""

from __future__ import annotations

import math


def finite(value) -> float | None:
    """`value` as a float when it is a finite number (a bool is not), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def finite_values(values: dict | None) -> dict[str, float]:
    """The entries of `values` that are finite numbers (what MLflow and KFP metrics accept)."""
    return {k: v for k, v in ((k, finite(v)) for k, v in (values or {}).items()) if v is not None}


def jsonable(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value
