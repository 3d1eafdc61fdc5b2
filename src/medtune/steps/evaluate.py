"""Step `evaluate`: base, candidate and champion (and, after a preference stage, the SFT-only result) answer the
same held-out questions and are scored alike.

`medtune evaluate` runs this step standalone (`score`, without MLflow) on any dataset the ingest reads.
"""

from pathlib import Path

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from medtune import config as config_mod
from medtune import runview
from medtune.steps import StepSpec, kfp_component

SPEC = StepSpec(name="evaluate", display_name="Evaluate candidate vs base vs champion", gpu=True, hub_token="read",
                model_cache=True, timeout_s=3 * 3600, records={"comparison": "comparison"})


def score(cfg: config_mod.Config, test_rows, trained_dir: Path | None, comparison_path: Path, predictions_dir: Path,
          perplexity_rows=None, sft_dir: Path | None = None) -> dict:
    """Score base, candidate (the trained weights, if any), the SFT-only result it was preference-tuned from
    (`sft_dir`, if given) and the registered champion (when there is one to compare) on `test_rows`;
    perplexity on `perplexity_rows` (default: the test rows). Writes comparison.json and predictions.jsonl
    and returns the comparison."""
    import tempfile

    from medtune import champion as champ
    from medtune import evaluate as ev
    from medtune import suites

    with tempfile.TemporaryDirectory(prefix="medtune-champion-") as tmp:
        champion, info = champ.resolve(cfg, Path(tmp))
        result = ev.evaluate(cfg, test_rows, trained_dir, perplexity_rows, champion, info,
                             suites=suites.scored_sets(cfg), sft_dir=sft_dir)
        return ev.write_outputs(result, comparison_path, predictions_dir)


def run(config_json: str, run_id: str, test_dir: str, adapter_dir: str, comparison_path: str,
        predictions_dir: str, val_dir: str | None = None, sft_dir: str | None = None) -> dict:
    """Score base, candidate and (when registered) champion on the test split, and the SFT-only result
    `sft_dir` when the preference stage ran; perplexity on validation."""
    import mlflow

    from medtune import rows, tags, tracking
    from medtune import evaluate as ev

    cfg = config_mod.from_json(config_json)
    with tracking.step(cfg, run_id, SPEC.name):
        sft = Path(sft_dir) if sft_dir and cfg.preference.enabled else None  # else it is the candidate itself
        comparison = score(cfg, rows.read(Path(test_dir)), Path(adapter_dir), Path(comparison_path),
                           Path(predictions_dir), rows.read(Path(val_dir)) if val_dir else None, sft)
        mlflow.log_metrics(ev.flat_metrics(comparison))
        mlflow.log_artifact(comparison_path, "evaluation")
        for answers in sorted(Path(predictions_dir).glob("*.jsonl")):  # the split's and each suite's
            mlflow.log_artifact(str(answers), "evaluation")
        info = comparison["champion_info"]
        mlflow.set_tag(tags.CHAMPION, f"{info.get('name')}/{info.get('version')}" if info.get("available")
                       else "none")
    parent = ev.flat_metrics(comparison)  # per model and per suite; intervals stay on the step's run
    tracking.log_parent_metrics(run_id, {k: v for k, v in parent.items() if not k.startswith("ci.")}, "")
    base, candidate = comparison.get("base") or {}, comparison.get("candidate") or {}
    runview.emit(headline=", ".join(f"{m} {base[m]:.3f}->{candidate[m]:.3f}" for m in ("rougeL", "token_f1",
                                                                                      "accuracy")
                                    if isinstance(base.get(m), float) and isinstance(candidate.get(m), float)))
    return comparison


@kfp_component(SPEC)
def evaluate(config: str, run_id: str, test_split: Input[Dataset], validation_split: Input[Dataset],
             adapter: Input[Model], sft_adapter: Input[Model], comparison: Output[Artifact],
             predictions: Output[Dataset], base_metrics: Output[Metrics], candidate_metrics: Output[Metrics]):
    """Answer the test split with the base model, the candidate and the MLflow `champion` (if any); score all
    on the same rows with paired bootstrap CIs; perplexity on the validation split. After a preference stage
    the SFT-only result is scored too, so the report shows what the stage added.

    Args:
        config: The resolved run-time config (JSON).
        run_id: The MLflow parent run id.
        test_split: The held-out questions.
        validation_split: Reference answers for the perplexity.
        adapter: The trained weights (adapter or full model).
        sft_adapter: The SFT-only weights the candidate was preference-tuned from (scored with
            preference.enabled; otherwise the candidate itself).
        comparison: Metrics of each model, deltas and paired bootstrap CIs.
        predictions: Every model's answer to every question, with per-row scores.
        base_metrics: The base model's metrics (KFP UI).
        candidate_metrics: The candidate's metrics (KFP UI).
    """
    from medtune.numeric import finite_values
    from medtune.steps import evaluate as step

    result = step.run(config, run_id, test_split.path, adapter.path, comparison.path, predictions.path,
                      val_dir=validation_split.path, sft_dir=sft_adapter.path)
    for name, output in (("base", base_metrics), ("candidate", candidate_metrics)):
        for key, value in finite_values(result.get(name)).items():
            output.log_metric(key, value)
    comparison.metadata.update(kind=result["kind"], n=result["n"],
                               champion=result["champion_info"].get("version") or "none")


component = evaluate
