"""Step `train`: fine-tune with TRL's SFTTrainer (LoRA, QLoRA or the full model; loss on the answer only)."""

import json
import shutil
from contextlib import contextmanager
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
        work_dir: str, trial: dict | None = None, outcome_path: str | None = None,
        checkpoint_out: str | None = None) -> dict:
    """Train one trial of the sweep (`trial`: {"index", "overrides"}; none: the config as it is) and write
    its outcome (status, reason, metrics, adapter hash) for `select`. In a sweep of several trials a failed
    or stopped trial is recorded, not raised: one bad learning rate must not end its siblings' loop. With
    `sweep.screen_fraction` < 1 a trial of several stops at its screen and leaves the checkpoint the winner
    resumes from (`checkpoint_out`; empty otherwise)."""
    import mlflow

    from medtune import sweep

    base = config_mod.from_json(config_json)
    # kfp.local passes the loop item's numbers as floats (index 1.0, lora.r 8.0); pydantic takes whole floats
    trial = {"index": int(trial["index"]), "overrides": trial["overrides"]} if trial else {"index": 0, "overrides": {}}
    cfg = trial_config(config_json, trial)
    several = len(base.trials()) > 1
    screen = base.sweep.screen_fraction if several else 1.0
    outcome = {"index": trial["index"], "trial": trial["overrides"], "lora_r": cfg.train.lora.r,
               "status": sweep.OK, "reason": "", "metrics": {}}
    name = f"{SPEC.name} trial {trial['index']}" if several else SPEC.name
    if checkpoint_out:
        Path(checkpoint_out).mkdir(parents=True, exist_ok=True)
    with tracking_step(cfg, run_id, name, trial):
        try:
            result = fit(cfg, run_id, train_dir, val_dir, adapter_dir, history_path, work_dir, screen_fraction=screen)
            outcome["metrics"] = result.metrics
            outcome["adapter_sha256"] = tree_sha256(Path(adapter_dir))
            if result.checkpoint is not None:
                outcome["screened"] = {"at_step": result.metrics["steps"], "of_steps": result.metrics["planned_steps"]}
                if checkpoint_out:
                    shutil.copytree(result.checkpoint, Path(checkpoint_out) / result.checkpoint.name)
        except Exception as exc:
            from medtune import tags
            from medtune.train import Preempted, TrainingFault

            if not several or isinstance(exc, Preempted):  # a preempted pod is retried and resumes
                raise
            outcome.update(status=sweep.STOPPED if isinstance(exc, TrainingFault) else sweep.FAILED,
                           reason=f"{type(exc).__name__}: {exc}")
            Path(adapter_dir).mkdir(parents=True, exist_ok=True)
            Path(history_path).write_text("[]")
            mlflow.set_tags({tags.TRIAL_STATUS: outcome["status"], tags.TRIAL_REASON: outcome["reason"][:500]})
    if checkpoint_out:  # never an empty folder: an object store has no empty "directories" to hand on
        (Path(checkpoint_out) / "screen.json").write_text(json.dumps({"screened": outcome.get("screened")}))
    if outcome_path:
        Path(outcome_path).write_text(json.dumps(outcome, indent=1))
    if not several:  # a sweep's winner is logged on the parent by `select` (and `finish`)
        from medtune import tracking

        tracking.log_parent_metrics(run_id, outcome["metrics"], "train.")
    return outcome


def trial_config(config_json: str, trial: dict) -> config_mod.Config:
    """The run's config with one trial's train.* overrides applied."""
    from medtune import sweep

    return config_mod.from_dict(sweep.apply(json.loads(config_json), trial["overrides"]),
                                origin=f"sweep trial {trial['index']}", model=config_mod.Config)


@contextmanager
def tracking_step(cfg, run_id: str, name: str, trial: dict):
    """The trial's nested run under the parent: its overrides as params (the loss curve and metrics follow)."""
    import mlflow

    from medtune import tags, tracking

    with tracking.step(cfg, run_id, name) as child:
        mlflow.set_tag(tags.TRIAL, str(trial["index"]))
        if trial["overrides"]:
            mlflow.log_params({f"train.{k}": v for k, v in trial["overrides"].items()})
        yield child


def tree_sha256(directory: Path) -> str:
    from medtune.lineage import hash_files, tree_digest

    return tree_digest(hash_files(directory))


def kept_checkpoints(cfg, run_id: str) -> Path | None:
    """Where this run's checkpoints are kept (train.checkpoint_dir, a PVC on the cluster): a retried step of the
    same run and config finds them there and resumes. None: a temporary folder of the step's own."""
    from medtune import train as trainer

    if not cfg.train.checkpoint_dir:
        return None
    return Path(cfg.train.checkpoint_dir).expanduser() / trainer.checkpoint_key(cfg, run_id)


def fit(cfg, run_id: str, train_dir: str, val_dir: str, adapter_dir: str, history_path: str, work_dir: str,
        checkpoints: Path | None = None, screen_fraction: float = 1.0, logged_before: int = 0):
    """Train (or resume the last checkpoint in `checkpoints`), write the history, log curve, metrics and weights
    to the active MLflow run; the curve from after step `logged_before` (earlier steps are on another run)."""
    import mlflow

    from medtune import rows
    from medtune import train as trainer

    checkpoints = checkpoints or kept_checkpoints(cfg, run_id)
    result = trainer.train(cfg, rows.read(Path(train_dir)), rows.read(Path(val_dir)), Path(adapter_dir),
                           Path(work_dir), checkpoints, screen_fraction=screen_fraction)
    Path(history_path).write_text(json.dumps(result.history, indent=1))
    for entry in result.history:
        for key in PER_STEP:
            if key in entry and entry["step"] > logged_before:
                mlflow.log_metric(key, entry[key], step=entry["step"])
    mlflow.log_metrics(result.metrics)
    mlflow.log_artifacts(adapter_dir, "adapter")
    return result


@kfp_component(SPEC)
def train(config: str, trial: dict, train_split: Input[Dataset], validation_split: Input[Dataset],
          adapter: Output[Model], history: Output[Artifact], outcome: Output[Artifact], checkpoint: Output[Artifact],
          metrics: Output[Metrics]):
    """Fine-tune with TRL's SFTTrainer (loss on the answer only).

    A retry of the same run resumes from the last checkpoint when train.checkpoint_dir is set.

    Args:
        config: The resolved run-time config (JSON).
        trial: This trial of the sweep: {"index", "overrides" (train.* fields), "run_id" (the MLflow parent run)}.
        train_split: Training rows.
        validation_split: Validation rows (evaluation loss, early stopping).
        adapter: The trained weights: a LoRA adapter (lora/qlora) or the full model (method full).
        history: Loss, learning rate and throughput per logged step.
        outcome: The trial's status (ok, stopped, failed), reason, metrics and adapter hash, for `select`.
        checkpoint: A screened trial's resumable checkpoint (sweep.screen_fraction < 1); empty otherwise.
        metrics: The run's final training metrics.
    """
    import tempfile

    from medtune.steps import train as step

    # gone when the step ends: checkpoints (tens of MB) would otherwise pile up in /tmp run after run locally
    with tempfile.TemporaryDirectory(prefix="medtune-train-") as work:
        result = step.run(config, trial["run_id"], train_split.path, validation_split.path, adapter.path,
                          history.path, work_dir=work, trial=trial, outcome_path=outcome.path,
                          checkpoint_out=checkpoint.path)
    outcome.metadata.update(status=result["status"], index=result["index"])
    for key, value in result["metrics"].items():
        metrics.log_metric(key, value)


component = train
