from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Output

from medtune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def gate(config: str, run_id: str, comparison: Input[Artifact], history: Input[Artifact],
         predictions: Input[Dataset], decision: Output[Artifact],
         report: Output[HTML]) -> bool:
    """Apply the promotion policy to the comparison and write the evaluation report; return passed.

    A plain `bool` return (output name `Output`), not a NamedTuple: kfp.local resolves a dsl.If condition
    only on `<task>-Output` channels.
    """
    from medtune import steps

    result = steps.gate(config, run_id, comparison.path, history.path, predictions.path, decision.path,
                        report.path)
    decision.metadata.update(passed=result["passed"], summary=result["summary"])
    return result["passed"]
