from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from medtune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(config: str, run_id: str, adapter: Input[Model], decision: Input[Artifact],
             registration: Output[Artifact]):
    """Register the adapter as a new MLflow model version (alias `challenger`)."""
    from medtune import steps

    result = steps.register(config, run_id, adapter.path, decision.path, registration.path)
    registration.metadata.update(result)
