"""Step `trials`: the sweep's trials (one train task each); a config without a sweep has one, `{}`."""

from typing import List

from medtune import config as config_mod
from medtune.steps import StepSpec, kfp_component

SPEC = StepSpec(name="trials", display_name="Expand sweep trials", mlflow=False, timeout_s=300)


def run(config_json: str) -> list[dict]:
    return [{"index": i, "overrides": t} for i, t in enumerate(config_mod.from_json(config_json).trials())]


@kfp_component(SPEC)
def trials(config: str) -> List[dict]:  # noqa: UP006 (KFP reads typing.List)
    """Expand the config's `sweep:` section into trials.

    Args:
        config: The resolved run-time config (JSON).

    Returns:
        One {"index", "overrides"} per trial: the train.* fields it sets.
    """
    from medtune.steps import trials as step

    return step.run(config)


component = trials
