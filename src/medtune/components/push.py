from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from medtune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def push(config: str, run_id: str, adapter: Input[Model], decision: Input[Artifact], comparison: Input[Artifact],
         splits: Input[Artifact], validation: Input[Artifact], registration: Input[Artifact],
         hub_push: Output[Artifact]):
    """Push the adapter (and its merged export) with model cards to the Hugging Face Hub, tagged with the run
    and the registered version, when a token is configured; else record why not."""
    from medtune import steps

    result = steps.push(config, run_id, adapter.path, decision.path, comparison.path, splits.path,
                        validation.path, registration.path, hub_push.path)
    hub_push.metadata.update(result)
