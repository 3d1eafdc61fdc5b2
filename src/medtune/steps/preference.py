"""Step `preference`: DPO after SFT on the winning trial's result (TRL's DPOTrainer), or a pass-through.

With `preference.enabled` false the SFT result and history go on unchanged (a copy), so the DAG has one shape
whatever the run's config says; the summary records that the stage was off.
"""

import json
import shutil
from pathlib import Path

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from medtune import config as config_mod
from medtune.config import RetryPolicy
from medtune.steps import StepSpec, kfp_component

# One retry: a lost or preempted GPU node. The data PVC: preference.data lies there like data.path.
SPEC = StepSpec(name="preference", display_name="Preference tuning (DPO) or pass-through", gpu=True,
                hub_token="read", model_cache=True, data_pvc=True, retry=RetryPolicy(retries=1, backoff_s=60),
                timeout_s=6 * 3600, records={"preference": "summary"})


def run(config_json: str, run_id: str, sft_dir: str, sft_history_path: str, train_dir: str, val_dir: str,
        test_dir: str, adapter_dir: str, history_path: str, pairs_dir: str, summary_path: str, work_dir: str) -> dict:
    """DPO-tune the SFT result (preference.enabled) or pass it on. The history written is the SFT history
    followed by the preference stage's entries (keys prefixed `dpo_`), so the report shows both; the summary
    holds the pairs' counts and fingerprints and the held-out scores before and after."""
    from medtune import runview

    cfg = config_mod.from_json(config_json)
    Path(pairs_dir).mkdir(parents=True, exist_ok=True)
    if not cfg.preference.enabled:  # before the training stack is imported: a pass-through takes seconds
        shutil.copytree(sft_dir, adapter_dir, dirs_exist_ok=True)
        shutil.copyfile(sft_history_path, history_path)
        summary = {"enabled": False, "reason": "preference.enabled is false: the SFT result went on unchanged"}
        for path in (Path(summary_path), Path(pairs_dir) / "summary.json"):  # no pairs: an artifact says why
            path.write_text(json.dumps(summary, indent=1))
        runview.emit(headline="off (preference.enabled is false)")
        return summary
    import mlflow

    from medtune import preference as pref
    from medtune import rows, tags, tracking
    from medtune.numeric import finite_values

    sft_history = json.loads(Path(sft_history_path).read_text())
    with tracking.step(cfg, run_id, SPEC.name):
        result, pairs = pref.run(cfg, Path(sft_dir), rows.read(Path(train_dir)), rows.read(Path(val_dir)),
                                 rows.read(Path(test_dir)), Path(adapter_dir), Path(pairs_dir), Path(work_dir))
        if pairs.validation_result is not None:  # a preference dataset: its contract's evidence
            from medtune import validate

            validate.write_outputs(pairs.validation_result, None, Path(pairs_dir) / "quarantine.jsonl",
                                   Path(pairs_dir) / "validation.json", Path(pairs_dir) / "data_docs.html")
        Path(history_path).write_text(json.dumps(sft_history + result.history, indent=1))
        for entry in result.history:
            for key, value in entry.items():
                if key.startswith(pref.HISTORY_PREFIX) and isinstance(value, (int, float)):
                    mlflow.log_metric(key.replace("/", "_"), value, step=entry["step"])
        summary = {"enabled": True, "pairs": pairs.summary(), "metrics": result.metrics}
        Path(summary_path).write_text(json.dumps(summary, indent=1))
        metrics = finite_values({k.replace("/", "_"): v for k, v in result.metrics.items()})
        mlflow.log_metrics(metrics)
        for name, split in summary["pairs"]["splits"].items():
            mlflow.set_tag(f"{tags.PAIRS_PREFIX}{name}.sha256", split["fingerprint"])
        mlflow.log_artifacts(pairs_dir, "pairs")
        mlflow.log_artifacts(adapter_dir, "adapter")
    tracking.log_parent_metrics(run_id, metrics, "preference.")
    if "after_rewards/margins" in result.metrics:
        m = result.metrics
        runview.emit(headline=f"margin {m['before_rewards/margins']:.3f}->{m['after_rewards/margins']:.3f}, "
                              f"accuracy {m['before_rewards/accuracies']:.2f}->{m['after_rewards/accuracies']:.2f}")
    return summary


@kfp_component(SPEC)
def preference(config: str, run_id: str, sft_adapter: Input[Model], sft_history: Input[Artifact],
               train_split: Input[Dataset], validation_split: Input[Dataset], test_split: Input[Dataset],
               adapter: Output[Model], history: Output[Artifact], pairs: Output[Dataset], summary: Output[Artifact],
               metrics: Output[Metrics]):
    """DPO after SFT (TRL DPOTrainer continuing the SFT result) when preference.enabled; otherwise the SFT
    result and history pass through unchanged.

    Args:
        config: The resolved run-time config (JSON).
        run_id: The MLflow parent run id.
        sft_adapter: The winning trial's trained weights (adapter or whole model).
        sft_history: The winning trial's training history.
        train_split: Training rows (self-play questions).
        validation_split: Validation rows (held-out self-play pairs).
        test_split: Test rows (a preference dataset's prompts that are test questions are dropped).
        adapter: The weights evaluate, register, push and serve use: DPO-tuned, or the SFT ones passed on.
        history: The SFT history followed by the preference stage's entries (keys prefixed dpo_).
        pairs: The preference pairs (train/validation rows, drops and quarantine with reasons).
        summary: Whether the stage ran; the pairs' counts and fingerprints; held-out scores before and after.
        metrics: The stage's final metrics (KFP UI).
    """
    import tempfile

    from medtune.numeric import finite_values
    from medtune.steps import preference as step

    # gone when the step ends: checkpoints (tens of MB) would otherwise pile up in /tmp run after run locally
    with tempfile.TemporaryDirectory(prefix="medtune-preference-") as work:
        result = step.run(config, run_id, sft_adapter.path, sft_history.path, train_split.path,
                          validation_split.path, test_split.path, adapter.path, history.path, pairs.path,
                          summary.path, work_dir=work)
    summary.metadata.update(enabled=result["enabled"])
    for key, value in finite_values(result.get("metrics")).items():
        metrics.log_metric(key.replace("/", "_"), value)


component = preference
