"""Step `preprocess`: de-duplicate, apply the token budget, split without leakage, render the chat template."""

import json
from pathlib import Path

from kfp.dsl import Artifact, Dataset, Input, Output

from medtune import config as config_mod
from medtune.config import RetryPolicy
from medtune import runview
from medtune.steps import StepSpec, kfp_component

SPEC = StepSpec(name="preprocess", display_name="Preprocess and split", hub_token="read", model_cache=True,
                retry=RetryPolicy(retries=3), timeout_s=3600, records={"splits": "summary"})


def run(config_json: str, run_id: str, data_dir: str, split_dirs: dict[str, str], summary_path: str) -> dict:
    import mlflow

    from medtune import models, rows, tracking
    from medtune import preprocess as prep

    cfg = config_mod.from_json(config_json)
    with tracking.step(cfg, run_id, SPEC.name):
        tokenizer = models.load_tokenizer(cfg.model)
        prepared = prep.prepare(rows.read(Path(data_dir)), tokenizer, cfg.preprocess)
        for name, df in prepared.splits.items():
            prep.write_split(df, Path(split_dirs[name]))
            split = prepared.summary["splits"][name]
            # digest: the split's sha256 (MLflow keeps 36 characters); the full value is a tag
            mlflow.log_input(mlflow.data.from_pandas(df.drop(columns=["n_tokens"]), source=_data_source(cfg.data),
                                                     name=f"medqa-{name}", digest=split["fingerprint"][:36]),
                             context=name, tags={"rows": str(split["rows"]), "sha256": split["fingerprint"]})
        Path(summary_path).write_text(json.dumps({**prepared.summary, "dropped": prepared.dropped,
                                                  "conflicts": prepared.conflicts}, indent=2, default=str))
        mlflow.log_dict(prepared.summary, "preprocess/summary.json")
        mlflow.log_text("".join(json.dumps(d, ensure_ascii=False, default=str) + "\n" for d in prepared.dropped),
                        "preprocess/quarantine.jsonl")
        mlflow.log_metrics({f"{n}_rows": s["rows"] for n, s in prepared.summary["splits"].items()})
        mlflow.log_metrics({f"dropped.{rule}": n for rule, n in prepared.summary["dropped_by_rule"].items()})
    runview.emit(splits={n: s["rows"] for n, s in prepared.summary["splits"].items()})
    return prepared.summary


def _data_source(data: config_mod.DataConfig):
    """Where the rows came from, as MLflow lineage: a Hub dataset (with split and revision) or a local path."""
    from medtune.ingest import HF_PREFIX

    if not data.path.startswith(HF_PREFIX):
        return data.path
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    return HuggingFaceDatasetSource(path=data.path.removeprefix(HF_PREFIX), config_name=data.hf_config,
                                    split=data.hf_split, revision=data.hf_revision)


@kfp_component(SPEC)
def preprocess(config: str, run_id: str, data: Input[Dataset], train_split: Output[Dataset],
               validation_split: Output[Dataset], test_split: Output[Dataset], summary: Output[Artifact]):
    """De-duplicate, apply the token budget, split without leakage and render with the chat template.

    Args:
        config: The resolved run-time config (JSON).
        run_id: The MLflow parent run id.
        data: The validated rows.
        train_split: Training rows (rows.jsonl), with the rendered prompt.
        validation_split: Validation rows: early stopping and the perplexity in evaluate.
        test_split: Held-out rows the evaluation answers.
        summary: Row counts and sha256 fingerprints per split, the dropped rows and why.
    """
    from medtune.steps import preprocess as step

    outputs = {"train": train_split, "validation": validation_split, "test": test_split}
    result = step.run(config, run_id, data.path, {k: v.path for k, v in outputs.items()}, summary.path)
    for name, artifact in outputs.items():
        artifact.metadata.update(result["splits"][name])


component = preprocess
