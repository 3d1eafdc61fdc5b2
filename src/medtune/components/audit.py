from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output

from medtune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def audit(config: str, run_id: str, data: Input[Dataset], quarantine: Input[Dataset], validation: Input[Artifact],
          data_docs: Input[HTML], train_split: Input[Dataset], validation_split: Input[Dataset],
          test_split: Input[Dataset], splits: Input[Artifact], adapter: Input[Model], history: Input[Artifact],
          comparison: Input[Artifact], predictions: Input[Dataset], decision: Input[Artifact], report: Input[HTML],
          lineage: Output[Artifact], registration: Input[Artifact] = None, hub_push: Input[Artifact] = None):
    """Write the run's audit record (lineage.json): every artifact of the run by sha256, linked to the data,
    code, config, images, base model, metrics, gate decision, registry version and Hub commit.

    The last step in both branches of the gate; `registration` and `hub_push` exist only when it passed.
    """
    from medtune import steps

    produced = {"validate_data/data": data, "validate_data/quarantine": quarantine,
                "validate_data/validation": validation, "validate_data/data_docs": data_docs,
                "preprocess/train_split": train_split, "preprocess/validation_split": validation_split,
                "preprocess/test_split": test_split, "preprocess/summary": splits, "train/adapter": adapter,
                "train/history": history, "evaluate/comparison": comparison, "evaluate/predictions": predictions,
                "gate/decision": decision, "gate/report": report, "register/registration": registration,
                "push/hub_push": hub_push}
    record = steps.audit(config, run_id, {k: (a.uri, a.path) for k, a in produced.items() if a is not None},
                         lineage.path)
    lineage.metadata.update(schema=record["schema"], gate_passed=record["gate"]["passed"],
                            model_version=record["mlflow"]["model_version"] or "none")
