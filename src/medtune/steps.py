"""One function per pipeline step: read inputs from paths, call the library, write outputs, log to MLflow.

KFP components are thin wrappers around these; tests and `medtune` commands call them directly. Every
function takes the resolved config as JSON, which is exactly what the pipeline passes between steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow

from medtune import config as config_mod
from medtune import quiet, tracking

quiet.library_noise_off()  # steps run in their own processes: this is where their output starts


def _cfg(config_json: str) -> config_mod.Config:
    return config_mod.from_json(config_json)


def open_run(config_json: str, pipeline_run: str, kfp_run_id: str = "", requested_by: str = "") -> str:
    return tracking.open_run(_cfg(config_json), pipeline_run, kfp_run_id, requested_by)


def validate_data(config_json: str, run_id: str, data_dir: str, quarantine_path: str, report_path: str,
                  docs_path: str | None = None) -> dict:
    from medtune import lineage, validate

    cfg = _cfg(config_json)
    with tracking.step(cfg, run_id, "validate_data"):
        # The source is hashed here because this is the step that can read it (the data PVC on a cluster).
        source = lineage.source_record(cfg.data.path)
        try:
            result = validate.validate(cfg.data, _data_tokenizer(cfg))
        except validate.ValidationStopped as stop:
            # The run stops, but with its evidence: quarantine, report and Data Docs are still logged.
            stop.validation.summary["source"] = source
            _log_validation(stop.validation, None, quarantine_path, report_path, docs_path)
            raise
        result.summary["source"] = source
        counts = _log_validation(result, data_dir, quarantine_path, report_path, docs_path)
    tracking.log_parent_metrics(run_id, counts, "data.")
    return result.summary


def _data_tokenizer(cfg: config_mod.Config):
    """The base model's tokenizer, loaded only when the data contract has token bounds."""
    if not (cfg.data.max_question_tokens or cfg.data.max_answer_tokens):
        return None
    from medtune import models

    return models.load_tokenizer(cfg.model)


def _log_validation(result, data_dir: str | None, quarantine_path: str, report_path: str,
                    docs_path: str | None) -> dict:
    from medtune import validate

    validate.write_outputs(result, Path(data_dir) if data_dir else None, Path(quarantine_path), Path(report_path),
                           Path(docs_path) if docs_path else None)
    counts = {k: result.summary[k] for k in ("rows_read", "rows_kept", "rows_quarantined", "kept_fraction")}
    mlflow.log_metrics(counts)
    mlflow.log_metrics({f"quarantined.{rule}": n for rule, n in result.summary["quarantined_by_rule"].items()})
    mlflow.log_dict(result.suite, "validation/expectation_suite.json")
    mlflow.log_artifact(report_path, "validation")
    mlflow.log_artifact(quarantine_path, "validation")
    if docs_path:
        mlflow.log_text(result.docs_html, "validation/data_docs.html")
    return counts


def preprocess(config_json: str, run_id: str, data_dir: str, split_dirs: dict[str, str], summary_path: str) -> dict:
    from medtune import models
    from medtune import preprocess as prep
    from medtune.validate import read_rows

    cfg = _cfg(config_json)
    with tracking.step(cfg, run_id, "preprocess"):
        tokenizer = models.load_tokenizer(cfg.model)
        prepared = prep.prepare(read_rows(Path(data_dir)), tokenizer, cfg.preprocess)
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
    return prepared.summary


def _data_source(data: config_mod.DataConfig):
    """Where the rows came from, as MLflow lineage: a Hub dataset (with split and revision) or a local path."""
    from medtune.ingest import HF_PREFIX

    if not data.path.startswith(HF_PREFIX):
        return data.path
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource

    return HuggingFaceDatasetSource(path=data.path.removeprefix(HF_PREFIX), config_name=data.hf_config,
                                    split=data.hf_split, revision=data.hf_revision)


def train(config_json: str, run_id: str, train_dir: str, val_dir: str, adapter_dir: str, history_path: str,
          work_dir: str) -> dict:
    from medtune import train as trainer
    from medtune.preprocess import read_split

    cfg = _cfg(config_json)
    # A retried step of the same run and config finds its checkpoints there (a PVC on the cluster) and resumes.
    checkpoints = (Path(cfg.train.checkpoint_dir).expanduser() / trainer.checkpoint_key(cfg, run_id)
                   if cfg.train.checkpoint_dir else None)
    with tracking.step(cfg, run_id, "train"):
        result = trainer.train(cfg, read_split(Path(train_dir)), read_split(Path(val_dir)), Path(adapter_dir),
                               Path(work_dir), checkpoints)
        Path(history_path).write_text(json.dumps(result.history, indent=1))
        per_step = ("loss", "eval_loss", "learning_rate", "grad_norm", "tokens_per_s", "peak_memory_mb", "mfu")
        for entry in result.history:
            for key in per_step:
                if key in entry:
                    mlflow.log_metric(key, entry[key], step=entry["step"])
        mlflow.log_metrics(result.metrics)
        mlflow.log_artifacts(adapter_dir, "adapter")
    tracking.log_parent_metrics(run_id, result.metrics, "train.")
    return result.metrics


def _finite(values: dict | None) -> dict[str, float]:
    import math

    return {k: float(v) for k, v in (values or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def evaluate(config_json: str, run_id: str, test_dir: str, adapter_dir: str, comparison_path: str,
             predictions_dir: str, val_dir: str | None = None) -> dict:
    """Score base, candidate and (when registered) champion on the test split; perplexity on validation."""
    import tempfile

    from medtune import champion as champ
    from medtune import evaluate as ev
    from medtune.preprocess import read_split

    cfg = _cfg(config_json)
    with tracking.step(cfg, run_id, "evaluate"), tempfile.TemporaryDirectory(prefix="medtune-champion-") as tmp:
        if cfg.eval.compare_champion:
            champion, info = champ.fetch(cfg.tracking.registered_model, Path(tmp))
        else:
            champion, info = None, {"available": False, "reason": "eval.compare_champion is false"}
        val = read_split(Path(val_dir)) if val_dir else None
        result = ev.evaluate(cfg, read_split(Path(test_dir)), Path(adapter_dir), val, champion, info)
        comparison = ev.write_outputs(result, Path(comparison_path), Path(predictions_dir))
        for name in ev.MODELS:
            mlflow.log_metrics({f"{name}.{k}": v for k, v in _finite(comparison.get(name)).items()})
        for pair, intervals in comparison["ci"].items():
            for metric, ci in (intervals or {}).items():
                mlflow.log_metrics({f"ci.{pair}.{metric}.{k}": ci[k] for k in ("delta", "low", "high")
                                    if ci.get(k) is not None})
        mlflow.log_artifact(comparison_path, "evaluation")
        mlflow.log_artifact(str(Path(predictions_dir) / "predictions.jsonl"), "evaluation")
        mlflow.set_tag("medtune.champion", f"{info.get('name')}/{info.get('version')}" if info.get("available")
                       else "none")
    for name in ev.MODELS:
        tracking.log_parent_metrics(run_id, _finite(comparison.get(name)), f"{name}.")
    return comparison


def gate(config_json: str, run_id: str, comparison_path: str, history_path: str, predictions_dir: str,
         decision_path: str, report_path: str) -> dict:
    """Apply the policy (cfg.gate) and write the report. A failed gate is a recorded decision, not an error."""
    import pandas as pd

    from medtune import gate as gating
    from medtune import report

    cfg = _cfg(config_json)
    comparison = json.loads(Path(comparison_path).read_text())
    decision = gating.decide(cfg.gate, comparison)
    Path(decision_path).write_text(json.dumps(decision, indent=2))
    predictions = pd.read_json(Path(predictions_dir) / "predictions.jsonl", orient="records", lines=True)
    history_file = Path(history_path) if history_path else None
    history = json.loads(history_file.read_text()) if history_file and history_file.exists() else []
    html = report.render(comparison, decision, history, predictions,
                         title=f"medtune evaluation: {cfg.name}, run {run_id}")
    Path(report_path).write_text(html)
    with tracking.step(cfg, run_id, "gate"):
        mlflow.log_dict(decision, "gate/decision.json")
        mlflow.log_dict(cfg.gate.model_dump(mode="json"), "gate/policy.json")
        mlflow.log_metric("gate_passed", float(decision["passed"]))
        mlflow.log_artifact(report_path, "report")
    client = mlflow.MlflowClient()
    client.set_tag(run_id, "medtune.gate", "passed" if decision["passed"] else "failed")
    client.set_tag(run_id, "medtune.gate_summary", decision["summary"][:5000])
    client.log_artifact(run_id, report_path, "report")
    client.log_dict(run_id, decision, "gate/decision.json")
    return decision


def register(config_json: str, run_id: str, adapter_dir: str, decision_path: str, output_path: str) -> dict:
    from medtune import registry

    cfg = _cfg(config_json)
    decision = json.loads(Path(decision_path).read_text())
    with tracking.step(cfg, run_id, "register"):
        result = registry.register(cfg, run_id, Path(adapter_dir), decision, Path(output_path).parent)
    Path(output_path).write_text(json.dumps(result, indent=2))
    mlflow.MlflowClient().set_tag(run_id, "medtune.model_version", f"{result['name']}/{result['version']}")
    return result


def push(config_json: str, run_id: str, adapter_dir: str, decision_path: str, comparison_path: str,
         splits_path: str, validation_path: str, registration_path: str, output_path: str) -> dict:
    from medtune import hub, modelcard

    cfg = _cfg(config_json)
    decision = json.loads(Path(decision_path).read_text())
    registration = json.loads(Path(registration_path).read_text())
    splits = json.loads(Path(splits_path).read_text())["splits"]
    data_sha256 = json.loads(Path(validation_path).read_text())["summary"]["source"]["sha256"]
    card_inputs = (cfg, run_id, json.loads(Path(comparison_path).read_text()), decision,
                   {n: {"rows": s["rows"], "fingerprint": s["fingerprint"]} for n, s in splits.items()}, data_sha256,
                   registration)
    cards = {"adapter": modelcard.render(*card_inputs), "merged": modelcard.render(*card_inputs, merged=True)}
    with tracking.step(cfg, run_id, "push"):
        result = hub.push(cfg, Path(adapter_dir), run_id, decision, cards, registration)
        mlflow.log_dict(result, "push/result.json")
        mlflow.log_text(cards["adapter"], "push/README.md")
    if result.get("commit"):  # the registry version points at what the Hub serves, and back
        client = mlflow.MlflowClient()
        for key, value in {"medtune.hub_repo": result["repo_id"], "medtune.hub_commit": result["commit"]}.items():
            client.set_model_version_tag(registration["name"], registration["version"], key, value)
    Path(output_path).write_text(json.dumps(result, indent=2))
    return result


def audit(config_json: str, run_id: str, artifacts: dict[str, tuple[str, str]], lineage_path: str) -> dict:
    """Write the run's audit record from every artifact the DAG produced (keyed "task/output": (uri, path));
    log it on the MLflow run and tag its hash on the run and on the registered version."""
    import hashlib

    from medtune import lineage

    cfg = _cfg(config_json)
    with tracking.step(cfg, run_id, "audit"):
        client = mlflow.MlflowClient()
        tags = client.get_run(run_id).data.tags
        run = {"mlflow_run_id": run_id, "pipeline_run": tags.get("medtune.pipeline_run"),
               "kfp_run_id": tags.get("medtune.kfp_run_id"),
               # who asked for the run; the OS user of the step's process only when nobody said
               "started_by": tags.get("medtune.requested_by") or tags.get("mlflow.user"),
               "tracking_uri": mlflow.get_tracking_uri()}
        stored = {key: lineage.Stored(uri, Path(path)) for key, (uri, path) in artifacts.items()}
        record = lineage.build(cfg, run, stored)
        text = lineage.write(record, Path(lineage_path)).read_text()
        digest = hashlib.sha256(text.encode()).hexdigest()
    client.log_text(run_id, text, f"lineage/{lineage.FILENAME}")  # the parent run: where people look
    # `model.revision` may be a branch that moves; these name the exact weights (Hub commit or content hash).
    base = record["base_model"]
    tags = {"medtune.lineage_sha256": digest, "medtune.base_model_commit": base["commit"],
            "medtune.base_model_sha256": base["sha256"]}
    tags = {k: v for k, v in tags.items() if v}
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    if record["mlflow"]["model_version"]:
        name, version = record["mlflow"]["model_version"].split("/")
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
    return record
