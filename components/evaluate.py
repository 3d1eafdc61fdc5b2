from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from medtune.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(config: str, run_id: str, test_split: Input[Dataset], adapter: Input[Model],
             comparison: Output[Artifact], predictions: Output[Dataset], base_metrics: Output[Metrics],
             candidate_metrics: Output[Metrics]):
    """Answer the test split with the base model and the candidate; score both on the same rows."""
    from medtune import steps

    result = steps.evaluate(config, run_id, test_split.path, adapter.path, comparison.path, predictions.path)
    for key in result["base"]:
        base_metrics.log_metric(key, result["base"][key])
        candidate_metrics.log_metric(key, result["candidate"][key])
