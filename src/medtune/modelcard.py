"""The model card pushed with an adapter: Hub metadata (model-index) plus what a reviewer must read.

Built with huggingface_hub's `ModelCard`/`EvalResult`, so the metadata is what the Hub parses.
"""

from __future__ import annotations

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from medtune.config import ADAPTER_METHODS, Config

REPORTED = ("token_f1", "rougeL", "rouge1", "rouge2", "bleu", "exact_match")

TEMPLATE = """
---
{{ card_data }}
---

# {{ model_name }}

{% if full -%}
**{{ base_model }}** with its weights fine-tuned ({{ method }}) by [medtune](https://github.com/medtune/medtune)
for medical question answering. Loads with plain `transformers`.
{%- elif merged -%}
**{{ base_model }}** with a {{ method }} adapter merged into its weights, fine-tuned by
[medtune](https://github.com/medtune/medtune) for medical question answering. Loads with plain `transformers`.
{%- else -%}
A LoRA adapter for **{{ base_model }}** ({{ method }}), fine-tuned by [medtune](https://github.com/medtune/medtune)
for medical question answering.
{%- endif %} Pipeline run `{{ run_id }}`{% if registration %}; MLflow
model `{{ registration.name }}` version {{ registration.version }} (tag `v{{ registration.version }}` here){% endif %}.

## Intended use
Answering general health-information questions in English, in products where a qualified person reviews what
reaches patients, and as a research baseline.

## Out of scope
Not for diagnosis, triage, dosing or any clinical decision. Not a substitute for a clinician. Not for
emergencies. Answers can be wrong, outdated or incomplete, and the model can state them confidently.

## Training data
Source: `{{ data_path }}` (sha256 `{{ data_sha256 }}`).

| split | rows | sha256 fingerprint |
|---|---:|---|
{% for name, split in splits.items() -%}
| {{ name }} | {{ split.rows }} | `{{ split.fingerprint }}` |
{% endfor %}

## Evaluation
{{ n }} held-out test questions on topics not seen in training, greedy decoding with `{{ decoding }}` (both
models; applied to the answer's tokens only, as `medtune.decoding` does, to get what was measured). Difference = candidate − base,
with a paired bootstrap {{ confidence }} confidence interval.

| metric | base | this adapter | difference [CI] |
|---|---:|---:|---|
{% for row in rows -%}
| {{ row.name }} | {{ row.base }} | {{ row.candidate }} | {{ row.delta }} |
{% endfor %}

## Promotion gate
**{{ "PASSED" if gate.passed else "FAILED" }}**: {{ gate.summary }}

| rule | value | verdict |
|---|---:|---|
{% for check in checks -%}
| {{ check.rule }} | {{ check.value }} | {{ check.verdict }} |
{% endfor %}

## Limitations
A small model trained briefly on a limited dataset; overlap metrics (token F1, ROUGE, BLEU) measure wording
against reference answers, not clinical correctness. Evaluate on your own data before use.
"""


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def render(cfg: Config, run_id: str, comparison: dict, decision: dict, splits: dict, data_sha256: str | None,
           registration: dict | None = None, merged: bool = False) -> str:
    """The README.md for the adapter repo, or (merged=True) for the repo of the merged export."""
    from medtune.hub import merged_repo_id

    repo = cfg.hub.repo_id or cfg.name
    repo = merged_repo_id(repo) if merged else repo
    candidate, base = comparison.get("candidate") or {}, comparison.get("base") or {}
    cis = (comparison.get("ci") or {}).get("candidate_vs_base", {})
    dataset = cfg.data.path if cfg.data.path.startswith("hf://") else "medtune-local"
    results = [EvalResult(task_type="question-answering", dataset_type=dataset.removeprefix("hf://"),
                          dataset_name=f"{cfg.name} test split", dataset_split="test", metric_type=metric,
                          metric_name=metric, metric_value=round(candidate[metric], 4))
               for metric in REPORTED if candidate.get(metric) is not None]
    full = cfg.train.method not in ADAPTER_METHODS  # a whole model, not an adapter
    data = ModelCardData(base_model=cfg.model.id,
                         base_model_relation="finetune" if full else "merge" if merged else "adapter",
                         library_name="transformers" if full or merged else "peft", license=cfg.hub.license,
                         language="en", pipeline_tag="text-generation",
                         tags=["medical", *([] if full else ["lora"]), cfg.train.method, "medtune"],
                         model_name=repo, eval_results=results or None)
    rows = []
    for metric in REPORTED:
        ci = cis.get(metric) or {}
        delta = (f"{ci['delta']:+.4f} [{ci['low']:+.4f}, {ci['high']:+.4f}]" if "low" in ci else "n/a")
        rows.append({"name": metric, "base": _fmt(base.get(metric)), "candidate": _fmt(candidate.get(metric)),
                     "delta": delta})
    checks = [{"rule": f"[{c.get('suite', 'test')}] {c['rule']}", "value": _fmt(c.get("value")),
               "verdict": c.get("verdict") or ("PASS" if c["passed"] else "FAIL")}
              for c in decision.get("checks", [])]
    confidence = f"{int(100 * (comparison.get('bootstrap') or {}).get('confidence', 0.95))}%"
    return ModelCard.from_template(
        data, template_str=TEMPLATE, model_name=repo, base_model=cfg.model.id,
        method=cfg.train.method, run_id=run_id, data_path=cfg.data.path, data_sha256=data_sha256 or "n/a",
        splits=splits, n=comparison.get("n", "?"), confidence=confidence, rows=rows, gate=decision, checks=checks,
        registration=registration, merged=merged, full=full,
        decoding=", ".join(f"{k}={v}" for k, v in cfg.decoding.model_dump().items()),
    ).content
