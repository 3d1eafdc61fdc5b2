"""Step `select`: the sweep's best trial by the selection metric; only its adapter, history and (screened
sweeps) checkpoint go on, to `finish`."""

import json
import shutil
from pathlib import Path
from typing import List

from kfp.dsl import Artifact, Input, Metrics, Model, Output

from medtune import config as config_mod
from medtune.steps import StepSpec, kfp_component

SPEC = StepSpec(name="select", display_name="Select the best trial", timeout_s=1800)


def run(config_json: str, run_id: str, outcome_paths: list[str], adapter_dirs: list[str],
        history_paths: list[str], adapter_dir: str, history_path: str, trials_path: str,
        checkpoint_dirs: list[str] = (), checkpoint_dir: str | None = None) -> dict:
    """Pick the winner among the trials' outcomes (in trial order, as the loop collected them), copy its
    adapter, history and checkpoint (empty unless the sweep screened) to this step's outputs and write the
    trials table (every trial, the winner marked). Raises with every trial's reason when none can win."""
    import mlflow

    from medtune import sweep, tracking

    cfg = config_mod.from_json(config_json)
    outcomes = [json.loads(Path(p).read_text()) for p in outcome_paths]
    table = {"metric": cfg.sweep.metric, "lower_is_better": cfg.sweep.lower_is_better, "winner": None,
             "trials": [{**o, "winner": False} for o in outcomes]}
    with tracking.step(cfg, run_id, SPEC.name):
        try:
            best = sweep.select(outcomes, cfg.sweep.metric, cfg.sweep.lower_is_better)
        finally:  # the table is the record of what each trial did, winner or not
            Path(trials_path).write_text(json.dumps(table, indent=1))
        position = outcomes.index(best)
        table["winner"] = best["index"]
        table["trials"][position]["winner"] = True
        Path(trials_path).write_text(json.dumps(table, indent=1))
        shutil.copytree(adapter_dirs[position], adapter_dir, dirs_exist_ok=True)
        shutil.copyfile(history_paths[position], history_path)
        if checkpoint_dir:
            Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
            if checkpoint_dirs:
                shutil.copytree(checkpoint_dirs[position], checkpoint_dir, dirs_exist_ok=True)
        mlflow.log_dict(table, "sweep/trials.json")
        mlflow.log_params({"winner": best["index"], "winner_settings": sweep.label(best["trial"])})
    tracking.log_parent_metrics(run_id, {**best["metrics"], "sweep_trial": best["index"]}, "train.")
    return table


@kfp_component(SPEC)
def select(config: str, run_id: str, outcomes: Input[List[Artifact]], adapters: Input[List[Model]],  # noqa: UP006
           histories: Input[List[Artifact]], checkpoints: Input[List[Artifact]],  # noqa: UP006
           adapter: Output[Model], history: Output[Artifact], checkpoint: Output[Artifact], trials: Output[Artifact],
           metrics: Output[Metrics]):
    """Pick the best trial of the sweep (failed and stopped trials never win; ties go to the cheaper one).

    Args:
        config: The resolved run-time config (JSON).
        run_id: The MLflow parent run id.
        outcomes: Every trial's status, metrics and adapter hash.
        adapters: Every trial's trained weights.
        histories: Every trial's training history.
        checkpoints: Every trial's resumable checkpoint (screened sweeps; empty otherwise).
        adapter: The winner's trained weights.
        history: The winner's training history.
        checkpoint: The winner's checkpoint, which `finish` resumes (empty unless the sweep screened).
        trials: Every trial with its settings, status, metrics and adapter hash; the winner marked.
        metrics: The winner's training metrics.
    """
    from medtune.steps import select as step

    table = step.run(config, run_id, [o.path for o in outcomes], [a.path for a in adapters],
                     [h.path for h in histories], adapter.path, history.path, trials.path,
                     [c.path for c in checkpoints], checkpoint.path)
    winner = next(t for t in table["trials"] if t["winner"])
    trials.metadata.update(winner=winner["index"], n=len(table["trials"]))
    for key, value in winner["metrics"].items():
        metrics.log_metric(key, value)


component = select
