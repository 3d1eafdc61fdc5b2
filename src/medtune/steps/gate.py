"""Step `gate`: apply the promotion policy (cfg.gate) to the comparison and write the evaluation report.

A failed gate is a recorded decision, not an error. `medtune evaluate` applies it standalone (`decide`).
"""

import json
from pathlib import Path

from kfp.dsl import HTML, Artifact, Dataset, Input, Output

from medtune import config as config_mod
from medtune import runview
from medtune.steps import StepSpec, kfp_component

SPEC = StepSpec(name="gate", display_name="Promotion gate", timeout_s=900, records={"decision": "decision"})


def decide(cfg: config_mod.Config, comparison_path: Path, history_path: Path | None, predictions_dir: Path,
           decision_path: Path, report_path: Path, title: str, policy_sha256: str = "",
           trials_path: Path | None = None) -> dict:
    """Write the decision (every check with its value, bound and verdict) and the HTML report."""
    import pandas as pd

    from medtune import gate as gating
    from medtune import report

    comparison = json.loads(Path(comparison_path).read_text())
    gating.check_policy(cfg, policy_sha256)  # on a cluster: the policy compiled into the pipeline, or nothing
    decision = gating.decide(cfg, comparison)
    Path(decision_path).write_text(json.dumps(decision, indent=2))
    predictions = pd.read_json(Path(predictions_dir) / "predictions.jsonl", orient="records", lines=True)
    history = json.loads(history_path.read_text()) if history_path and history_path.exists() else []
    trials = json.loads(trials_path.read_text()) if trials_path else None
    Path(report_path).write_text(report.render(comparison, decision, history, predictions, title=title,
                                               length_change_flag=cfg.eval.length_change_flag, trials=trials))
    return decision


def run(config_json: str, run_id: str, comparison_path: str, history_path: str, predictions_dir: str,
        decision_path: str, report_path: str, policy_sha256: str = "", trials_path: str | None = None) -> dict:
    import mlflow

    from medtune import tags, tracking

    cfg = config_mod.from_json(config_json)
    decision = decide(cfg, Path(comparison_path), Path(history_path) if history_path else None,
                      Path(predictions_dir), Path(decision_path), Path(report_path),
                      title=f"medtune evaluation: {cfg.name}, run {run_id}", policy_sha256=policy_sha256,
                      trials_path=Path(trials_path) if trials_path else None)
    with tracking.step(cfg, run_id, SPEC.name):
        mlflow.log_dict(decision, "gate/decision.json")
        mlflow.log_dict(decision["policy"], "gate/policy.json")
        mlflow.log_metric("gate_passed", float(decision["passed"]))
        mlflow.log_artifact(report_path, "report")
    client = mlflow.MlflowClient()
    client.set_tag(run_id, tags.GATE, "passed" if decision["passed"] else "failed")
    client.set_tag(run_id, tags.GATE_SUMMARY, decision["summary"][:5000])
    client.log_artifact(run_id, report_path, "report")
    client.log_dict(run_id, decision, "gate/decision.json")
    failing = next((c for c in decision.get("checks", []) if not c.get("passed")), None)
    runview.emit(passed=decision["passed"], reason=failing["rule"] if failing else decision["summary"])
    return decision


@kfp_component(SPEC)
def gate(config: str, run_id: str, comparison: Input[Artifact], history: Input[Artifact],
         predictions: Input[Dataset], trials: Input[Artifact], decision: Output[Artifact], report: Output[HTML],
         policy_sha256: str = "") -> bool:
    """Apply the promotion policy to the comparison and write the evaluation report.

    A plain `bool` return (output name `Output`), not a NamedTuple: kfp.local resolves a dsl.If condition
    only on `<task>-Output` channels.

    Args:
        config: The resolved run-time config (JSON); its `gate` section is the policy.
        run_id: The MLflow parent run id.
        comparison: The evaluate step's metrics and CIs.
        history: The training history (loss curve in the report).
        predictions: Every model's answers (examples in the report).
        trials: The sweep's trials table (report: settings vs selection metric).
        decision: Every check with its value, bound and verdict, and the summary.
        report: The HTML evaluation report.
        policy_sha256: The policy's hash, a constant compiled into the pipeline (on a cluster the step stops
            when the run's config has another policy: a run parameter cannot loosen it).

    Returns:
        Whether the candidate passed (the DAG registers and pushes only then).
    """
    from medtune.steps import gate as step

    result = step.run(config, run_id, comparison.path, history.path, predictions.path, decision.path, report.path,
                      policy_sha256, trials_path=trials.path)
    decision.metadata.update(passed=result["passed"], summary=result["summary"])
    return result["passed"]


component = gate
