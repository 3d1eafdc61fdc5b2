"""Step `register` (gate passed): a new MLflow model version of the trained weights, alias `challenger`."""

import json
from pathlib import Path

from kfp.dsl import Artifact, Input, Model, Output

from medtune import config as config_mod
from medtune.config import RetryPolicy
from medtune import runview
from medtune.steps import StepSpec, kfp_component

SPEC = StepSpec(name="register", display_name="Register model version", retry=RetryPolicy(retries=3),
                branch="passed", records={"registration": "registration"})


def run(config_json: str, run_id: str, adapter_dir: str, decision_path: str, output_path: str) -> dict:
    import mlflow

    from medtune import registry, tags, tracking

    cfg = config_mod.from_json(config_json)
    decision = json.loads(Path(decision_path).read_text())
    with tracking.step(cfg, run_id, SPEC.name):
        result = registry.register(cfg, run_id, Path(adapter_dir), decision, Path(output_path).parent)
    Path(output_path).write_text(json.dumps(result, indent=2))
    mlflow.MlflowClient().set_tag(run_id, tags.MODEL_VERSION, f"{result['name']}/{result['version']}")
    runview.emit(note=f"{result['name']} version {result['version']} ({', '.join(result.get('aliases') or [])})")
    return result


@kfp_component(SPEC)
def register(config: str, run_id: str, adapter: Input[Model], decision: Input[Artifact],
             registration: Output[Artifact]):
    """Register the trained weights as a new MLflow model version (alias `challenger`; `champion` too when
    the decision says promote).

    Args:
        config: The resolved run-time config (JSON).
        run_id: The MLflow parent run id.
        adapter: The trained weights (adapter or full model).
        decision: The gate's decision (tagged on the version).
        registration: The registered name, version, model URI and aliases.
    """
    from medtune.steps import register as step

    result = step.run(config, run_id, adapter.path, decision.path, registration.path)
    registration.metadata.update(result)


component = register
