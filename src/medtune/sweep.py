"""Hyperparameter sweep: expand the `sweep:` section into trials, apply one to a config, pick the winner.

A trial is a dict of `train.*` overrides (dotted below `train`, e.g. {"learning_rate": 3e-4, "lora.r": 8}).
A config without a sweep has exactly one trial, `{}`: the pipeline always fans out, and a single trial is
the plain pipeline.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

# stopped: the training guard ended it (non-finite loss, learning-rate explosion, out of memory); failed: any
# other error. Neither can win. A trial that early-stopped on patience finished normally and can.
OK, STOPPED, FAILED = "ok", "stopped", "failed"


def expand(sweep) -> list[dict[str, Any]]:
    """The grid's cartesian product, each point combined with `sweep.trials` random samples of the ranges
    (log-uniform for fields whose name ends in `rate`, integers where both bounds are integers)."""
    keys = list(sweep.grid)
    points = [dict(zip(keys, values)) for values in itertools.product(*(sweep.grid[k] for k in keys))]
    if not sweep.ranges:
        return points
    rng = random.Random(sweep.seed)
    return [{**point, **{key: sample(rng, key, *bounds) for key, bounds in sweep.ranges.items()}}
            for point in points for _ in range(sweep.trials)]


def sample(rng: random.Random, key: str, low: float, high: float) -> float | int:
    if isinstance(low, int) and isinstance(high, int):
        return rng.randint(low, high)
    if key.endswith("rate"):  # rates matter by order of magnitude
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    return rng.uniform(low, high)


def apply(tree: dict[str, Any], trial: dict[str, Any]) -> dict[str, Any]:
    """A copy of a config tree (Config.model_dump) with the trial's `train.*` overrides set."""
    import copy

    tree = copy.deepcopy(tree)
    for dotted, value in trial.items():
        *parents, leaf = dotted.split(".")
        node = tree["train"]
        for key in parents:
            node = node[key]
        node[leaf] = value
    return tree


def label(trial: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.items()) or "defaults"


def cost(outcome: dict) -> tuple:
    """Cheaper first: fewer optimizer steps, then a smaller LoRA rank, then the earlier trial."""
    return (outcome.get("metrics", {}).get("steps", math.inf), outcome.get("lora_r", math.inf), outcome["index"])


def select(outcomes: list[dict], metric: str, lower_is_better: bool = True) -> dict:
    """The best trial by `metric` among those that finished (ties go to the cheaper trial); failed and
    early-stopped trials never win. Raises with every trial's reason when none can."""
    eligible = [o for o in outcomes if o["status"] == OK and math.isfinite(o.get("metrics", {}).get(metric, math.nan))]
    if not eligible:
        reasons = "; ".join(f"trial {o['index']} ({label(o['trial'])}): {o['status']}: "
                            f"{o.get('reason') or f'no {metric}'}" for o in sorted(outcomes, key=lambda o: o["index"]))
        raise RuntimeError(f"no trial of the sweep can win: {reasons}")
    sign = 1 if lower_is_better else -1
    return min(eligible, key=lambda o: (sign * o["metrics"][metric], cost(o)))


def closing_note(table: dict) -> list[str]:
    """One line per trial for `medtune run`'s closing note: settings, status or metric (and where a screened
    trial was measured), the winner marked with its finished metric."""
    metric = table["metric"]
    return [f"trial {t['index']} ({label(t['trial'])}): "
            + (f"{metric} {t['metrics'][metric]:.4f}" if metric in t["metrics"] else f"{t['status']}: {t['reason']}")
            + (f" at step {t['screened']['at_step']} of {t['screened']['of_steps']}" if t.get("screened") else "")
            + (f" (winner{finished(t, metric)})" if t["winner"] else "") for t in table["trials"]]


def finished(trial: dict, metric: str) -> str:
    done = (trial.get("finished") or {}).get("metrics", {})
    return f"; finished: {metric} {done[metric]:.4f} at step {done['steps']}" if metric in done else ""
