"""Step `trials`: the sweep's trials (one train task each); a config without a sweep has one, `{}`."""

from typing import List

from medtune import config as config_mod
from medtune.steps import StepSpec, kfp_component

SPEC = StepSpec(name="trials", display_name="Expand sweep trials", mlflow=False, timeout_s=300)


def run(config_json: str, run_id: str) -> list[dict]:
    # The run id travels in each item: kfp.local (2.17.3) hands a ParallelFor body the loop item in place of
    # every parameter that comes from another task's output, so the train task reads no such parameter.
    return [{"index": i, "overrides": t, "run_id": run_id}
            for i, t in enumerate(config_mod.from_json(config_json).trials())]


@kfp_component(SPEC)
def trials(config: str, run_id: str) -> List[dict]:  # noqa: UP006 (KFP reads typing.List)
    """Expand the config's `sweep:` section into trials.

    Args:
        config: The resolved run-time config (JSON).
        run_id: The MLflow parent run id (each trial's train task logs under it).

    Returns:
        One {"index", "overrides", "run_id"} per trial: the train.* fields it sets.
    """
    from medtune.steps import trials as step

    return step.run(config, run_id)


component = trials
