from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from medtune.images import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def evaluate(config: str, run_id: str, test_split: Input[Dataset], validation_split: Input[Dataset],
             adapter: Input[Model], comparison: Output[Artifact], predictions: Output[Dataset],
             base_metrics: Output[Metrics], candidate_metrics: Output[Metrics]):
    """Answer the test split with the base model, the candidate and the MLflow `champion` (if any); score all
    on the same rows with paired bootstrap CIs; perplexity on the validation split."""
    import math

    from medtune import steps

    result = steps.evaluate(config, run_id, test_split.path, adapter.path, comparison.path, predictions.path,
                            val_dir=validation_split.path)
    for name, output in (("base", base_metrics), ("candidate", candidate_metrics)):
        for key, value in (result.get(name) or {}).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                output.log_metric(key, value)
    comparison.metadata.update(kind=result["kind"], n=result["n"],
                               champion=result["champion_info"].get("version") or "none")
