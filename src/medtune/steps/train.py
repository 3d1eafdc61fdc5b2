"""Step `train`: fine-tune with TRL's SFTTrainer (LoRA, QLoRA or the full model; loss on the answer only)."""

import json
from pathlib import Path

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from medtune import config as config_mod
from medtune.config import RetryPolicy
from medtune.steps import StepSpec, kfp_component

# One retry: a lost or preempted GPU node; the retry resumes from the last checkpoint (train.checkpoint_dir).
SPEC = StepSpec(name="train", display_name="Train LoRA/QLoRA adapter", gpu=True, hub_token="read", model_cache=True,
                retry=RetryPolicy(retries=1, backoff_s=60), timeout_s=6 * 3600)
PER_STEP = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "peak_memory_mb", "mfu")


def run(config_json: str, run_id: str, train_dir: str, val_dir: str, adapter_dir: str, history_path: str,
        work_dir: str) -> dict:
    import mlflow

    from medtune import rows, tracking
    from medtune import train as trainer

    cfg = config_mod.from_json(config_json)
    # A retried step of the same run and config finds its checkpoints there (a PVC on the cluster) and resumes.
    checkpoints = (Path(cfg.train.checkpoint_dir).expanduser() / trainer.checkpoint_key(cfg, run_id)
                   if cfg.train.checkpoint_dir else None)
    with tracking.step(cfg, run_id, SPEC.name):
        result = trainer.train(cfg, rows.read(Path(train_dir)), rows.read(Path(val_dir)), Path(adapter_dir),
                               Path(work_dir), checkpoints)
        Path(history_path).write_text(json.dumps(result.history, indent=1))
        for entry in result.history:
            for key in PER_STEP:
                if key in entry:
                    mlflow.log_metric(key, entry[key], step=entry["step"])
        mlflow.log_metrics(result.metrics)
        mlflow.log_artifacts(adapter_dir, "adapter")
    tracking.log_parent_metrics(run_id, result.metrics, "train.")
    return result.metrics


@kfp_component(SPEC)
def train(config: str, run_id: str, train_split: Input[Dataset], validation_split: Input[Dataset],
          adapter: Output[Model], history: Output[Artifact], metrics: Output[Metrics]):
    """Fine-tune with TRL's SFTTrainer (loss on the answer only).

    A retry of the same run resumes from the last checkpoint when train.checkpoint_dir is set.

    Args:
        config: The resolved run-time config (JSON).
        run_id: The MLflow parent run id.
        train_split: Training rows.
        validation_split: Validation rows (evaluation loss, early stopping).
        adapter: The trained weights: a LoRA adapter (lora/qlora) or the full model (method full).
        history: Loss, learning rate and throughput per logged step.
        metrics: The run's final training metrics.
    """
    import tempfile

    from medtune.steps import train as step

    result = step.run(config, run_id, train_split.path, validation_split.path, adapter.path, history.path,
                      work_dir=tempfile.mkdtemp(prefix="medtune-train-"))
    for key, value in result.items():
        metrics.log_metric(key, value)


component = train
