"""Step `validate_data`: ingest the configured source and run the data contract (Great Expectations).

`medtune data validate` is this step run standalone (`validate`, without MLflow).
"""

from pathlib import Path

from kfp.dsl import HTML, Artifact, Dataset, Output

from medtune import config as config_mod
from medtune.config import RetryPolicy
from medtune import runview
from medtune.steps import StepSpec, kfp_component

SPEC = StepSpec(name="validate_data", display_name="Validate data", hub_token="read", data_pvc=True,
                retry=RetryPolicy(retries=2), timeout_s=3600, records={"validation": "validation"})


def validate(cfg: config_mod.Config, data_dir: str | None, quarantine_path: str, report_path: str,
             docs_path: str | None = None):
    """Validate cfg.data and write kept rows, quarantine, report and Data Docs; a blocking failure still writes
    its evidence (quarantine, report, Data Docs) before ValidationStopped propagates."""
    from medtune import lineage
    from medtune import validate as validation

    # The source is hashed here because this is the step that can read it (the data PVC on a cluster),
    # after reading it: a Hub dataset is then in the cache, at the commit the rows came from.
    try:
        result = validation.validate(cfg.data, data_tokenizer(cfg))
    except validation.ValidationStopped as stop:
        stop.validation.summary["source"] = lineage.source_record(cfg.data.path, cfg.data.hf_revision)
        _write(stop.validation, None, quarantine_path, report_path, docs_path)
        raise
    result.summary["source"] = lineage.source_record(cfg.data.path, cfg.data.hf_revision)
    _write(result, data_dir, quarantine_path, report_path, docs_path)
    return result


def _write(result, data_dir, quarantine_path, report_path, docs_path) -> None:
    from medtune import validate as validation

    validation.write_outputs(result, Path(data_dir) if data_dir else None, Path(quarantine_path), Path(report_path),
                             Path(docs_path) if docs_path else None)


def data_tokenizer(cfg: config_mod.Config):
    """The base model's tokenizer, loaded only when the data contract has token bounds."""
    if not (cfg.data.max_question_tokens or cfg.data.max_answer_tokens):
        return None
    from medtune import models

    try:
        return models.load_tokenizer(cfg.model)
    except (OSError, ValueError) as exc:
        raise ValueError(f"token bounds are set (data.max_*_tokens) but the tokenizer of model.id={cfg.model.id} "
                         f"cannot be loaded: {exc}") from exc


def run(config_json: str, run_id: str, data_dir: str, quarantine_path: str, report_path: str,
        docs_path: str | None = None) -> dict:
    from medtune import tracking
    from medtune import validate as validation

    cfg = config_mod.from_json(config_json)
    with tracking.step(cfg, run_id, SPEC.name):
        try:
            result = validate(cfg, data_dir, quarantine_path, report_path, docs_path)
        except validation.ValidationStopped as stop:
            # The run stops, but with its evidence: quarantine, report and Data Docs are logged too.
            _log(stop.validation, quarantine_path, report_path, docs_path, cfg.data.log_raw_quarantine)
            raise
        counts = _log(result, quarantine_path, report_path, docs_path, cfg.data.log_raw_quarantine)
    tracking.log_parent_metrics(run_id, counts, "data.")
    runview.emit(**{k: counts[k] for k in ("rows_read", "rows_kept", "rows_quarantined")})
    return result.summary


def _log(result, quarantine_path: str, report_path: str, docs_path: str | None, log_raw_quarantine: bool) -> dict:
    import mlflow

    from medtune import validate as validation

    counts = {k: result.summary[k] for k in ("rows_read", "rows_kept", "rows_quarantined", "kept_fraction")}
    mlflow.log_metrics(counts)
    mlflow.log_metrics({f"quarantined.{rule}": n for rule, n in result.summary["quarantined_by_rule"].items()})
    mlflow.log_dict(result.suite, "validation/expectation_suite.json")
    mlflow.log_artifact(report_path, "validation")
    mlflow.log_artifact(quarantine_path, "validation")  # masked; the raw one stays local unless asked for
    if log_raw_quarantine:
        mlflow.log_artifact(str(validation.raw_quarantine_path(Path(quarantine_path))), "validation")
    if docs_path:
        mlflow.log_text(result.docs_html, "validation/data_docs.html")
    return counts


@kfp_component(SPEC)
def validate_data(config: str, run_id: str, data: Output[Dataset], quarantine: Output[Dataset],
                  validation: Output[Artifact], data_docs: Output[HTML]):
    """Ingest the configured source and run the Great Expectations suite; stop on a blocking failure.

    Args:
        config: The resolved run-time config (JSON).
        run_id: The MLflow parent run id.
        data: The rows that passed (rows.jsonl).
        quarantine: Every rejected row with its source file, line and the rule it failed.
        validation: The validation report: counts, the suite and GX's result.
        data_docs: The suite's GX Data Docs page for this run (also logged to MLflow).
    """
    from medtune.steps import validate_data as step

    summary = step.run(config, run_id, data.path, quarantine.path, validation.path, data_docs.path)
    data.metadata.update(rows=summary["rows_kept"])
    quarantine.metadata.update(rows=summary["rows_quarantined"], by_rule=summary["quarantined_by_rule"])
    validation.metadata.update(rows_read=summary["rows_read"], kept_fraction=summary["kept_fraction"])


component = validate_data
