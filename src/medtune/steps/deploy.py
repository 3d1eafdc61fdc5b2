"""Step `deploy` (gate passed, after register and push): serve the registered version on KServe, or say why not."""

import json
from pathlib import Path

from kfp.dsl import Artifact, Input, Output

from medtune import config as config_mod
from medtune.steps import StepSpec, kfp_component

# The timeout covers deploy.ready_timeout_s (default 900 s) plus staging the adapter onto the PVC.
SPEC = StepSpec(name="deploy", display_name="Deploy on KServe", model_cache=True, deployer_token=True,
                timeout_s=1800, branch="passed", records={"deployment": "deployment"})


def run(config_json: str, run_id: str, registration_path: str, output_path: str) -> dict:
    import mlflow

    from medtune import kserve, models, tracking

    cfg = config_mod.from_json(config_json)
    registration = json.loads(Path(registration_path).read_text())
    with tracking.step(cfg, run_id, SPEC.name):
        result = kserve.deploy_step(cfg, registration, models.cache_root(cfg.model))
        mlflow.log_dict(result, "deploy/result.json")
    Path(output_path).write_text(json.dumps(result, indent=2))
    return result


@kfp_component(SPEC)
def deploy(config: str, run_id: str, registration: Input[Artifact], deployment: Output[Artifact]):
    """Serve the registered version on KServe: the champion's InferenceService when it was promoted, else the
    challenger's beside it; wait for Ready and ask a smoke question. A failed rollout restores the previous
    version and fails here with the reason; with deploy.enabled false or no cluster, record why it skipped.

    Args:
        config: The resolved run-time config (JSON).
        run_id: The MLflow parent run id.
        registration: The registered version (name, version, promoted).
        deployment: The InferenceService's name, generation, image digest and smoke answer, or why skipped.
    """
    from medtune.steps import deploy as step

    result = step.run(config, run_id, registration.path, deployment.path)
    deployment.metadata.update({k: v for k, v in result.items() if isinstance(v, (str, int, bool))})


component = deploy
