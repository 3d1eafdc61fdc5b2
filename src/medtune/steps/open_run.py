"""Step `open_run`: the MLflow parent run that every later step of the pipeline run logs under."""

from medtune import config as config_mod
from medtune.steps import StepSpec, kfp_component

SPEC = StepSpec(name="open_run", display_name="Open MLflow run", timeout_s=600)


def run(config_json: str, pipeline_run: str, kfp_run_id: str = "", requested_by: str = "") -> str:
    from medtune import tracking

    return tracking.open_run(config_mod.from_json(config_json), pipeline_run, kfp_run_id, requested_by)


@kfp_component(SPEC)
def open_run(config: str, pipeline_run: str, kfp_run_id: str, requested_by: str) -> str:
    """Create the MLflow parent run that every later step logs under.

    Args:
        config: The resolved run-time config (JSON).
        pipeline_run: The pipeline run's name (KFP's job name).
        kfp_run_id: The KFP run id, linking the MLflow run back to Kubeflow.
        requested_by: Who asked for the run (user of `medtune run`/`submit`, or the schedule).

    Returns:
        The MLflow parent run id.
    """
    from medtune.steps import open_run as step

    return step.run(config, pipeline_run, kfp_run_id, requested_by)


component = open_run
