"""Step `push` (gate passed): the trained weights and a model card to the Hugging Face Hub, when a token is set."""

import json
from pathlib import Path

from kfp.dsl import Artifact, Input, Model, Output

from medtune import config as config_mod
from medtune.config import RetryPolicy
from medtune.steps import StepSpec, kfp_component

SPEC = StepSpec(name="push", display_name="Push adapter to the Hub", hub_token="write", retry=RetryPolicy(retries=3),
                branch="passed", records={"hub": "hub_push"})


def run(config_json: str, run_id: str, adapter_dir: str, decision_path: str, comparison_path: str,
        splits_path: str, validation_path: str, registration_path: str, output_path: str) -> dict:
    import mlflow

    from medtune import hub, modelcard, tags, tracking

    cfg = config_mod.from_json(config_json)
    decision = json.loads(Path(decision_path).read_text())
    registration = json.loads(Path(registration_path).read_text())
    splits = json.loads(Path(splits_path).read_text())["splits"]
    data_sha256 = json.loads(Path(validation_path).read_text())["summary"]["source"]["sha256"]
    card_inputs = (cfg, run_id, json.loads(Path(comparison_path).read_text()), decision,
                   {n: {"rows": s["rows"], "fingerprint": s["fingerprint"]} for n, s in splits.items()}, data_sha256,
                   registration)
    cards = {"adapter": modelcard.render(*card_inputs), "merged": modelcard.render(*card_inputs, merged=True)}
    with tracking.step(cfg, run_id, SPEC.name):
        result = hub.push(cfg, Path(adapter_dir), run_id, decision, cards, registration)
        mlflow.log_dict(result, "push/result.json")
        mlflow.log_text(cards["adapter"], "push/README.md")
    if result.get("commit"):  # the registry version points at what the Hub serves, and back
        client = mlflow.MlflowClient()
        for key, value in {tags.HUB_REPO: result["repo_id"], tags.HUB_COMMIT: result["commit"]}.items():
            client.set_model_version_tag(registration["name"], registration["version"], key, value)
    Path(output_path).write_text(json.dumps(result, indent=2))
    return result


@kfp_component(SPEC)
def push(config: str, run_id: str, adapter: Input[Model], decision: Input[Artifact], comparison: Input[Artifact],
         splits: Input[Artifact], validation: Input[Artifact], registration: Input[Artifact],
         hub_push: Output[Artifact]):
    """Push the trained weights (and the merged export) with model cards to the Hugging Face Hub, tagged with
    the run and the registered version, when a token is configured; else record why not.

    Args:
        config: The resolved run-time config (JSON).
        run_id: The MLflow parent run id.
        adapter: The trained weights (adapter or full model).
        decision: The gate's decision (model card).
        comparison: Metrics with CIs (model card).
        splits: Split fingerprints (model card).
        validation: The validation report: the data's sha256 (model card).
        registration: The registered version the Hub tag names.
        hub_push: The repo, commit and tags pushed, or why nothing was.
    """
    from medtune.steps import push as step

    result = step.run(config, run_id, adapter.path, decision.path, comparison.path, splits.path,
                      validation.path, registration.path, hub_push.path)
    hub_push.metadata.update(result)


component = push
