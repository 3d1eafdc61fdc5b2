"""KServe deployment: rendered objects against KServe's CRD schema (vendored), and deploy / rollback against a
Kubernetes API STAND-IN (tests/kube_standin.py; no cluster exists here), through the official client."""

from __future__ import annotations

from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from medtune import cli, kserve
from medtune import config as config_mod

from kube_standin import KubeStandIn

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "configs" / "qwen2.5-0.5b-qlora.yaml"
SCHEMA = yaml.safe_load((Path(__file__).parent / "kserve_crd_schema.yaml").read_text())
IMAGE = "docker.io/vllm/vllm-openai:v0.11.0@sha256:" + "ab" * 32  # a test value: no registry is reachable
ENABLE = ["deploy.enabled=true", f"deploy.runtime_image={IMAGE}", "deploy.ready_timeout_s=10"]


@pytest.fixture
def cfg() -> config_mod.Config:
    return config_mod.load(PROFILE, ENABLE)


def crd_check(obj: dict) -> None:
    """KServe's schema, plus the strict unknown-field check the API server applies with fieldValidation=Strict
    (a structural schema would otherwise prune a misspelt field silently)."""
    schema = SCHEMA[obj["kind"]]
    jsonschema.validate(obj, schema)

    def unknown(node, sub, path):
        if isinstance(node, dict) and "properties" in sub:
            for key, value in node.items():
                if key not in sub["properties"]:
                    raise jsonschema.ValidationError(f"unknown field {path}{key}")
                unknown(value, sub["properties"][key], f"{path}{key}.")
        elif isinstance(node, list) and "items" in sub:
            for i, item in enumerate(node):
                unknown(item, sub["items"], f"{path}{i}.")

    unknown(obj, schema, "")


def test_rendered_kserve_objects_validate_against_the_crd_schema(cfg):
    for obj in (kserve.serving_runtime(cfg), kserve.inference_service(cfg, "7"),
                kserve.inference_service(cfg, "8", role="challenger")):
        crd_check(obj)
    isvc = kserve.inference_service(cfg, "7")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"
    predictor = isvc["spec"]["predictor"]
    name = "medtune-qwen2.5-0.5b-medqa"
    assert predictor["model"]["args"] == ["--lora-modules", f"{name}:7=/mnt/models/adapters/{name}/7"]
    assert predictor["model"]["storageUri"] == f"pvc://{cfg.deploy.model_cache_pvc}/"
    assert predictor["model"]["resources"]["limits"] == {"cpu": "4", "memory": "16Gi", "nvidia.com/gpu": "1"}
    runtime = kserve.serving_runtime(cfg)["spec"]["containers"][0]
    assert runtime["image"] == IMAGE and "--enable-lora" in runtime["args"]
    assert "--model=Qwen/Qwen2.5-0.5B" in runtime["args"]
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in runtime["env"]


@pytest.mark.parametrize("damage", [
    lambda o: o["spec"]["predictor"].update(minReplica=1),                 # misspelt field
    lambda o: o["spec"]["predictor"].update(scaleMetric="gpu"),           # not in KServe's enum
    lambda o: o["spec"]["predictor"]["model"]["resources"]["limits"].update(cpu="four"),  # not a quantity
    lambda o: o["spec"]["predictor"]["model"].pop("modelFormat") and o["spec"]["predictor"]["model"].update(
        modelFormat={"version": "1"}),                                      # modelFormat.name is required
    lambda o: o["spec"].pop("predictor"),
])
def test_the_schema_check_rejects_broken_objects(cfg, damage):
    obj = kserve.inference_service(cfg, "7")
    damage(obj)
    with pytest.raises(jsonschema.ValidationError):
        crd_check(obj)


def test_rbac_allows_only_kserve_objects_in_its_namespace(cfg):
    account, role, binding, token = kserve.rbac(cfg)
    assert token["metadata"]["annotations"] == {"kubernetes.io/service-account.name": "medtune-deployer"}
    for obj in (account, role, binding, token):
        kubernetes_validate.validate(obj, "1.30", strict=True)
        assert obj["metadata"]["namespace"] == cfg.deploy.namespace
    assert role["rules"] == [{"apiGroups": ["serving.kserve.io"],
                              "resources": ["inferenceservices", "servingruntimes"],
                              "verbs": ["get", "list", "watch", "create", "update", "patch"]}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "medtune-deployer",
                                    "namespace": cfg.deploy.namespace}]


def test_config_refuses_an_unpinned_runtime_image():
    with pytest.raises(config_mod.ConfigError, match="deploy.runtime_image"):
        config_mod.load(PROFILE, ["deploy.enabled=true", "deploy.runtime_image=vllm/vllm-openai:v0.11.0"])
    with pytest.raises(config_mod.ConfigError, match="needs deploy.runtime_image"):
        config_mod.load(PROFILE, ["deploy.enabled=true"])


def test_skip_reasons(cfg, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert "deploy.enabled is false" in kserve.skip_reason(config_mod.load(PROFILE))
    assert "kfp.local" in kserve.skip_reason(cfg)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    assert kserve.skip_reason(cfg) is None


def _deploy(cfg, kube, version, role="champion"):
    return kserve.deploy(cfg, kserve.Cluster(kserve.connect(kube.url)), version, role, poll_s=0.01, with_rbac=True)


def test_deploy_creates_waits_for_ready_and_asks_the_smoke_question(cfg):
    with KubeStandIn(polls_to_ready=3) as kube:
        result = _deploy(cfg, kube, "1")
    assert result["deployed"] and result["name"] == "medtune" and result["generation"] == 1
    assert result["image_digest"] == "sha256:" + "ab" * 32 and result["previous_version"] is None
    assert result["served_model"] == "medtune-qwen2.5-0.5b-medqa:1"
    assert result["smoke"]["answer"] == f"stand-in answer to: {cfg.deploy.smoke_question}"
    calls = [(m, p.split("?")[0]) for m, p, _ in kube.requests]
    isvcs = "/apis/serving.kserve.io/v1beta1/namespaces/medtune/inferenceservices"
    assert ("POST", "/api/v1/namespaces/medtune/serviceaccounts") in calls
    assert ("POST", "/api/v1/namespaces/medtune/secrets") in calls
    assert ("POST", "/apis/rbac.authorization.k8s.io/v1/namespaces/medtune/roles") in calls
    assert ("POST", "/apis/serving.kserve.io/v1alpha1/namespaces/medtune/servingruntimes") in calls
    assert calls.index(("POST", isvcs)) < calls.index(("POST", "/models/medtune/v1/chat/completions"))
    assert calls.count(("GET", f"{isvcs}/medtune")) == 2 + 3  # previous version, apply, then until Ready
    created = next(b for m, p, b in kube.requests if (m, p.split("?")[0]) == ("POST", isvcs))
    crd_check(created)


def test_failed_update_keeps_the_previous_champion_serving(cfg):
    with KubeStandIn(broken=("2",)) as kube:
        _deploy(cfg, kube, "1")
        _deploy(cfg, kube, "1")  # same spec again: RBAC/runtime conflicts tolerated, no new generation
        assert kube.isvc("medtune", "medtune")["metadata"]["generation"] == 1
        with pytest.raises(kserve.DeployFailed) as failed:
            _deploy(cfg, kube, "2")
        isvc = kube.isvc("medtune", "medtune")
    assert "not Ready" in str(failed.value) and "CUDA out of memory" in str(failed.value)
    assert "restored to version 1" in str(failed.value)
    assert isvc["metadata"]["labels"]["medtune/model-version"] == "1"
    assert isvc["spec"] == kserve.inference_service(cfg, "1")["spec"]
    assert isvc["metadata"]["generation"] == 3  # v1, v2, v1 again


def test_the_pipeline_step_identity_touches_no_rbac(cfg):
    """The step runs as the deployer (which may not grant itself rights): RBAC is the admin's, applied once."""
    with KubeStandIn() as kube:
        kserve.deploy(cfg, kserve.Cluster(kserve.connect(kube.url)), "1", poll_s=0.01)
    touched = {p.split("/")[-1].split("?")[0] for _, p, _ in kube.requests}
    assert not touched & {"serviceaccounts", "secrets", "roles", "rolebindings"}
    assert {"servingruntimes", "inferenceservices"} <= touched


def test_a_failed_smoke_question_restores_the_previous_version(cfg):
    with KubeStandIn() as kube:
        _deploy(cfg, kube, "1")
        kube.smoke_status = 503
        with pytest.raises(kserve.DeployFailed, match="smoke question.*restored to version 1"):
            _deploy(cfg, kube, "2")
        assert kube.isvc("medtune", "medtune")["metadata"]["labels"]["medtune/model-version"] == "1"


def test_challenger_is_served_beside_the_champion(cfg):
    with KubeStandIn() as kube:
        champion = _deploy(cfg, kube, "1")
        challenger = _deploy(cfg, kube, "2", role="challenger")
        assert kube.isvc("medtune", "medtune")["metadata"]["labels"]["medtune/model-version"] == "1"
        assert kube.isvc("medtune", "medtune-challenger")["metadata"]["labels"]["medtune/role"] == "challenger"
    assert (champion["name"], challenger["name"]) == ("medtune", "medtune-challenger")
    assert challenger["served_model"] == "medtune-qwen2.5-0.5b-medqa:2"


def test_cli_deploy_and_rollback(tmp_path, monkeypatch):
    """Rollback serves the old version again; the registry alias move fails here (no MLflow server at that
    address) and is reported, not fatal: the cluster already serves the version."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    runner = CliRunner()
    sets = [a for s in [*ENABLE, "tracking.tracking_uri=http://127.0.0.1:9"] for a in ("--set", s)]
    with KubeStandIn() as kube:
        first = runner.invoke(cli.app, ["deploy", "--host", kube.url, "--version", "1", "--poll-s", "0.01",
                                        "-c", str(PROFILE), *sets])
        assert first.exit_code == 0, first.output
        second = runner.invoke(cli.app, ["deploy", "--host", kube.url, "--version", "2", "--poll-s", "0.01",
                                         "-c", str(PROFILE), *sets])
        assert second.exit_code == 0, second.output
        back = runner.invoke(cli.app, ["rollback", "--host", kube.url, "--to", "1", "--poll-s", "0.01",
                                       "-c", str(PROFILE), *sets])
        assert back.exit_code == 0, back.output
        assert "registry alias was not moved" in back.output
        assert "could not read version 1's gated decoding from the registry" in " ".join(back.output.split())
        assert kube.isvc("medtune", "medtune")["metadata"]["labels"]["medtune/model-version"] == "1"
        assert kube.isvc("medtune", "medtune")["metadata"]["generation"] == 3
        kube.broken.add("3")
        bad = runner.invoke(cli.app, ["deploy", "--host", kube.url, "--version", "3", "--poll-s", "0.01",
                                      "-c", str(PROFILE), *sets])
    assert bad.exit_code == 1 and "restored to version 1" in bad.output
    assert '"generation": 2' in second.stdout and '"image_digest": "sha256:' in second.stdout
