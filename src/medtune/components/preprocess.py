from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from medtune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preprocess(config: str, run_id: str, data: Input[Dataset], train_split: Output[Dataset],
               validation_split: Output[Dataset], test_split: Output[Dataset], summary: Output[Artifact]):
    """De-duplicate, apply the token budget, split without leakage and render with the chat template."""
    from medtune import steps

    outputs = {"train": train_split, "validation": validation_split, "test": test_split}
    result = steps.preprocess(config, run_id, data.path, {k: v.path for k, v in outputs.items()}, summary.path)
    for name, artifact in outputs.items():
        artifact.metadata.update(result["splits"][name])
