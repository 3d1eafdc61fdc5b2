from kfp import dsl

from medtune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def open_run(config: str, pipeline_run: str, kfp_run_id: str, requested_by: str) -> str:
    """Create the MLflow parent run that every later step logs under; returns its id."""
    from medtune import steps

    return steps.open_run(config, pipeline_run, kfp_run_id, requested_by)
