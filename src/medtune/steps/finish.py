"""Step `finish`: the winner of a screened sweep trains the rest of its steps; otherwise a pass-through.

With `sweep.screen_fraction` < 1 (successive halving) every trial stopped at its screen and left a checkpoint;
`select` picked the best there, and this step resumes that checkpoint to the end of the schedule, so the winner
ends with the weights it would have had if it had trained straight through. Unscreened runs (one trial, or a
fraction of 1) pass the winner's adapter and history on unchanged, so the DAG has one shape.

The trials table written here is the run's record of the sweep: every trial as `select` saw it, and the winner's
finished metrics and adapter hash (the weights that are evaluated) under `finished`.
"""

import json
import shutil
from pathlib import Path

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from medtune import config as config_mod
from medtune.config import RetryPolicy
from medtune.steps import StepSpec, kfp_component

# One retry: a lost or preempted GPU node; with train.checkpoint_dir the retry resumes from its last checkpoint.
SPEC = StepSpec(name="finish", display_name="Finish the winning trial's training or pass-through", gpu=True,
                hub_token="read", model_cache=True, retry=RetryPolicy(retries=1, backoff_s=60), timeout_s=6 * 3600,
                records={"trials": "trials"})


def run(config_json: str, run_id: str, sft_dir: str, sft_history_path: str, checkpoint_dir: str, trials_in: str,
        train_dir: str, val_dir: str, adapter_dir: str, history_path: str, trials_path: str, work_dir: str) -> dict:
    """Resume the winner's screen checkpoint (`checkpoint_dir`) to its last step, or pass the winner on."""
    from medtune import runview, tracking
    from medtune.steps import train

    table = json.loads(Path(trials_in).read_text())
    winner = next(t for t in table["trials"] if t["winner"])
    if not winner.get("screened"):
        shutil.copytree(sft_dir, adapter_dir, dirs_exist_ok=True)
        shutil.copyfile(sft_history_path, history_path)
        Path(trials_path).write_text(json.dumps(table, indent=1))
        runview.emit(headline="the winner trained in full (no screen)")
        return table
    trial = {"index": winner["index"], "overrides": winner["trial"]}
    cfg = train.trial_config(config_json, trial)
    # the trial's own kept folder, if any: a retried step resumes from its latest checkpoint
    checkpoints = train.kept_checkpoints(cfg, run_id) or Path(work_dir) / "checkpoints"
    shutil.copytree(checkpoint_dir, checkpoints, dirs_exist_ok=True)
    with train.tracking_step(cfg, run_id, f"{SPEC.name} trial {trial['index']}", trial):
        # the screen's steps are on the trial's own run (`train trial N`); this run has the rest of the curve
        result = train.fit(cfg, run_id, train_dir, val_dir, adapter_dir, history_path, work_dir, checkpoints,
                           logged_before=winner["screened"]["at_step"])
    winner["finished"] = {"metrics": result.metrics, "adapter_sha256": train.tree_sha256(Path(adapter_dir))}
    Path(trials_path).write_text(json.dumps(table, indent=1))
    tracking.log_parent_metrics(run_id, result.metrics, "train.")
    metric = table["metric"]
    if metric in result.metrics:
        runview.emit(headline=f"trial {trial['index']}: steps {winner['screened']['at_step']}->"
                              f"{result.metrics['steps']}, {metric} {winner['metrics'][metric]:.4f}->"
                              f"{result.metrics[metric]:.4f}")
    return table


@kfp_component(SPEC)
def finish(config: str, run_id: str, sft_adapter: Input[Model], sft_history: Input[Artifact],
           checkpoint: Input[Artifact], trials_in: Input[Artifact], train_split: Input[Dataset],
           validation_split: Input[Dataset], adapter: Output[Model], history: Output[Artifact],
           trials: Output[Artifact], metrics: Output[Metrics]):
    """Train the rest of the winning trial's steps from its screen checkpoint (screened sweeps), or pass the
    winner's adapter and history on unchanged.

    Args:
        config: The resolved run-time config (JSON).
        run_id: The MLflow parent run id.
        sft_adapter: The winning trial's weights as `select` chose them (at its screen, if screened).
        sft_history: The winning trial's training history.
        checkpoint: The winner's screen checkpoint (empty unless the sweep screened).
        trials_in: The trials table `select` wrote.
        train_split: Training rows.
        validation_split: Validation rows (the finished run's validation loss).
        adapter: The winner's finished weights: what preference tuning continues, or what is evaluated.
        history: The winner's whole training history.
        trials: Every trial with its settings, status, metrics and adapter hash; the winner marked, with its
            finished metrics and adapter hash.
        metrics: The winner's final training metrics.
    """
    import tempfile

    from medtune.numeric import finite_values
    from medtune.steps import finish as step

    # gone when the step ends: checkpoints (tens of MB) would otherwise pile up in /tmp run after run locally
    with tempfile.TemporaryDirectory(prefix="medtune-finish-") as work:
        table = step.run(config, run_id, sft_adapter.path, sft_history.path, checkpoint.path, trials_in.path,
                         train_split.path, validation_split.path, adapter.path, history.path, trials.path, work)
    winner = next(t for t in table["trials"] if t["winner"])
    trials.metadata.update(winner=winner["index"], n=len(table["trials"]))
    for key, value in finite_values((winner.get("finished") or winner)["metrics"]).items():
        metrics.log_metric(key, value)


component = finish
