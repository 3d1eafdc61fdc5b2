"""Deploy a registered adapter on KServe: render, apply, wait for Ready, smoke-test, keep the old one on failure.

Objects (rendered from the profile's `deploy:` and `cluster:` sections):
  ServingRuntime `<name>-vllm`   vLLM's OpenAI server (image pinned by digest) with LoRA enabled, base model
                                 read from the model-cache PVC (mounted at /mnt/models by storageUri pvc://)
  InferenceService `<name>`      the champion (RawDeployment: a plain Deployment + HPA, no Knative); a
                                 challenger is `<name>-challenger` beside it, under its own served name
  ServiceAccount/Role/RoleBinding the deployer may manage only these two kinds in its namespace; a token
                                 Secret `<service account>-token` gives the pipeline's deploy step that identity
                                 (KFP cannot set a service account per task). An admin applies these
                                 (`medtune deploy` does, with the caller's rights); the step never widens them.

The served model name is `<registered model>:<version>`, as `medtune serve` names it. The adapter must be on
the PVC at `adapters/<registered model>/<version>` (the pipeline's deploy step puts it there).

Applying replaces the InferenceService spec; if the new version is not Ready in time or fails the smoke
question, the previous spec is put back (the Deployment's rolling update kept the old pods serving
meanwhile) and the deploy fails with the reason.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import PurePosixPath

from medtune.config import Config

GROUP = "serving.kserve.io"
ISVC = ("v1beta1", "inferenceservices", "InferenceService")
RUNTIME = ("v1alpha1", "servingruntimes", "ServingRuntime")
MOUNT = "/mnt/models"  # where KServe mounts a pvc:// storageUri
MODEL_FORMAT = "vllm-lora"
MANAGED = {"app.kubernetes.io/managed-by": "medtune"}
ROLES = ("champion", "challenger")


class DeployFailed(RuntimeError):
    pass


def served_name(cfg: Config, version: str) -> str:
    return f"{cfg.tracking.registered_model}:{version}"


def isvc_name(cfg: Config, role: str) -> str:
    return cfg.deploy.name if role == "champion" else f"{cfg.deploy.name}-{role}"


def adapter_path(cfg: Config, version: str) -> str:
    """Where the adapter of `version` lies on the model-cache PVC, relative to its root."""
    return str(PurePosixPath("adapters") / cfg.tracking.registered_model / version)


def image_digest(image: str) -> str:
    return image.rpartition("@")[2]


def skip_reason(cfg: Config) -> str | None:
    """Why the deploy step does nothing here, or None when it should deploy."""
    if not cfg.deploy.enabled:
        return "deploy.enabled is false in the profile"
    if not os.environ.get("KUBERNETES_SERVICE_HOST"):
        return "no Kubernetes cluster here (kfp.local run): nothing to deploy to"
    return None


# ---- rendering ---------------------------------------------------------------------------------------------

def _base_model(cfg: Config) -> tuple[str, list[dict]]:
    """The `--model` argument for vLLM and the env it needs, both pointing into the PVC."""
    model = cfg.model
    if model.source == "hub":
        offline = [{"name": "HF_HOME", "value": f"{MOUNT}/huggingface"}, {"name": "HF_HUB_OFFLINE", "value": "1"}]
        return model.id, offline
    if model.source == "pypi_gguf":
        return f"{MOUNT}/{model.gguf_file.removesuffix('.gguf')}", []
    cache = PurePosixPath(model.cache_dir)
    path = PurePosixPath(model.id)
    if not path.is_relative_to(cache):
        raise ValueError(f"model.id={model.id}: a source=path model must lie under model.cache_dir={model.cache_dir} "
                         "(the PVC) to be served")
    return f"{MOUNT}/{path.relative_to(cache)}", []


def _quantities(cfg: Config) -> dict:
    r = cfg.deploy.resources
    amounts = {"cpu": r.cpu, "memory": r.memory}
    if r.gpu:
        amounts[cfg.deploy.gpu_resource] = str(r.gpu)
    return {"requests": amounts, "limits": dict(amounts)}


def _meta(cfg: Config, name: str, **extra) -> dict:
    return {"name": name, "namespace": cfg.deploy.namespace, "labels": dict(MANAGED), **extra}


def runtime_name(cfg: Config) -> str:
    return f"{cfg.deploy.name}-vllm"


def serving_runtime(cfg: Config) -> dict:
    base, env = _base_model(cfg)
    revision = [f"--revision={cfg.model.revision}"] if cfg.model.source == "hub" else []
    return {
        "apiVersion": f"{GROUP}/{RUNTIME[0]}", "kind": RUNTIME[2],
        "metadata": _meta(cfg, runtime_name(cfg)),
        "spec": {
            "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "1", "autoSelect": False}],
            "protocolVersions": ["v2"],
            "containers": [{
                "name": "kserve-container",
                "image": cfg.deploy.runtime_image,
                "command": ["python3", "-m", "vllm.entrypoints.openai.api_server"],
                "args": ["--port=8080", f"--model={base}", *revision, "--enable-lora", "--max-loras=1",
                         f"--max-model-len={cfg.deploy.max_model_len}"],
                "env": env,
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/health", "port": 8080}, "periodSeconds": 10},
            }],
        },
    }


def inference_service(cfg: Config, version: str, role: str = "champion") -> dict:
    d = cfg.deploy
    name = served_name(cfg, version)
    annotations = {"serving.kserve.io/deploymentMode": "RawDeployment", "serving.kserve.io/autoscalerClass": "hpa",
                   "medtune/registered-model": cfg.tracking.registered_model}
    labels = {**MANAGED, "medtune/role": role, "medtune/model-version": version}
    return {
        "apiVersion": f"{GROUP}/{ISVC[0]}", "kind": ISVC[2],
        "metadata": {**_meta(cfg, isvc_name(cfg, role)), "labels": labels, "annotations": annotations},
        "spec": {"predictor": {
            "minReplicas": d.min_replicas, "maxReplicas": d.max_replicas,
            "scaleMetric": "cpu", "scaleTarget": d.scale_target,
            "model": {
                "modelFormat": {"name": MODEL_FORMAT, "version": "1"},
                "runtime": runtime_name(cfg),
                "storageUri": f"pvc://{cfg.deploy.model_cache_pvc}/",
                "args": ["--lora-modules", f"{name}={MOUNT}/{adapter_path(cfg, version)}"],
                "resources": _quantities(cfg),
            },
        }},
    }


def rbac(cfg: Config) -> list[dict]:
    """The deployer's identity: InferenceServices and ServingRuntimes in its namespace, nothing else."""
    sa = cfg.deploy.service_account
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(cfg, sa),
            "rules": [{"apiGroups": [GROUP], "resources": [ISVC[1], RUNTIME[1]],
                       "verbs": ["get", "list", "watch", "create", "update", "patch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": _meta(cfg, sa),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
               "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": cfg.deploy.namespace}]}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(cfg, sa)}
    token = {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/service-account-token",
             "metadata": _meta(cfg, token_secret(cfg), annotations={"kubernetes.io/service-account.name": sa})}
    return [account, role, binding, token]


def token_secret(cfg: Config) -> str:
    return f"{cfg.deploy.service_account}-token"


# ---- applying ----------------------------------------------------------------------------------------------

IN_CLUSTER = "https://kubernetes.default.svc"
POD_CA = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


def connect(host: str | None = None, token: str | None = None):
    """A kubernetes ApiClient: `host` (+ bearer token) when given, in-cluster config in a pod, else kubeconfig."""
    from kubernetes import client, config

    if host:
        conf = client.Configuration()
        conf.host = host.rstrip("/")
        if token:
            conf.api_key = {"authorization": f"Bearer {token}"}
        if host == IN_CLUSTER and os.path.exists(POD_CA):
            conf.ssl_ca_cert = POD_CA
        return client.ApiClient(conf)
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()
    else:
        config.load_kube_config()
    return client.ApiClient()


@dataclass
class Cluster:
    """The few Kubernetes calls deploy makes, through the official client."""

    api: object

    def _custom(self):
        from kubernetes import client

        return client.CustomObjectsApi(self.api)

    def get(self, kind: tuple, namespace: str, name: str) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._custom().get_namespaced_custom_object(GROUP, kind[0], namespace, kind[1], name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def apply(self, kind: tuple, obj: dict) -> dict:
        """Create, or replace the spec of the existing object (keeping its resourceVersion)."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        current = self.get(kind, ns, name)
        if current is None:
            return self._custom().create_namespaced_custom_object(GROUP, kind[0], ns, kind[1], obj)
        body = {**obj, "metadata": {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
        return self._custom().replace_namespaced_custom_object(GROUP, kind[0], ns, kind[1], name, body)

    def apply_rbac(self, objects: list[dict]) -> None:
        from kubernetes import utils
        from kubernetes.client.exceptions import ApiException

        for obj in objects:
            try:
                utils.create_from_dict(self.api, obj)
            except utils.FailToCreateError as exc:
                if not all(isinstance(e, ApiException) and e.status == 409 for e in exc.api_exceptions):
                    raise  # 409: it exists already, and RBAC objects are never changed by deploy


def _ready(isvc: dict) -> tuple[bool, str]:
    status = isvc.get("status") or {}
    if status.get("observedGeneration", 0) < isvc["metadata"].get("generation", 0):
        return False, "the controller has not seen the new spec yet"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True", f"Ready={cond.get('status')}: {cond.get('reason', '')} " \
                                                 f"{cond.get('message', '')}".strip()
    return False, "no Ready condition yet"


def wait_ready(cluster: Cluster, namespace: str, name: str, timeout_s: float, poll_s: float = 5.0) -> dict:
    deadline, why = time.monotonic() + timeout_s, "not polled"
    while True:
        isvc = cluster.get(ISVC, namespace, name)
        ready, why = _ready(isvc) if isvc else (False, "it does not exist")
        if ready:
            return isvc
        if time.monotonic() >= deadline:
            raise DeployFailed(f"InferenceService {namespace}/{name} not Ready after {timeout_s:.0f} s ({why})")
        time.sleep(poll_s)


def smoke(url: str, model: str, question: str, timeout_s: float = 120.0) -> str:
    """One question through the OpenAI route; the answer must come from `model` and not be empty."""
    body = json.dumps({"model": model, "max_tokens": 64, "temperature": 0,
                       "messages": [{"role": "user", "content": question}]}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            answer = json.loads(response.read())
    except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as exc:
        raise DeployFailed(f"smoke question to {url} failed: {exc}") from None
    text = ((answer.get("choices") or [{}])[0].get("message") or {}).get("content")
    if answer.get("model") != model or not text:
        raise DeployFailed(f"smoke question to {url}: expected an answer from {model}, got model="
                           f"{answer.get('model')!r} text={text!r}")
    return text


def deploy(cfg: Config, cluster: Cluster, version: str, role: str = "champion", smoke_url: str | None = None,
           poll_s: float = 5.0, with_rbac: bool = False) -> dict:
    """Apply the runtime and the InferenceService for `version` (and the RBAC objects, `with_rbac`), wait for
    Ready, ask the smoke question. On failure the previous spec (if any) is restored and DeployFailed says why."""
    if role not in ROLES:
        raise ValueError(f"role={role}: one of {ROLES}")
    ns, name = cfg.deploy.namespace, isvc_name(cfg, role)
    if with_rbac:
        cluster.apply_rbac(rbac(cfg))
    cluster.apply(RUNTIME, serving_runtime(cfg))
    previous = cluster.get(ISVC, ns, name)
    previous_version = (previous or {}).get("metadata", {}).get("labels", {}).get("medtune/model-version")
    cluster.apply(ISVC, inference_service(cfg, version, role))
    try:
        isvc = wait_ready(cluster, ns, name, cfg.deploy.ready_timeout_s, poll_s)
        url = smoke_url or (isvc["status"].get("address") or {}).get("url") or isvc["status"].get("url")
        answer = smoke(url, served_name(cfg, version), cfg.deploy.smoke_question)
    except DeployFailed as exc:
        if previous is None:
            raise DeployFailed(f"{exc}; no previous version of {name} to keep serving") from None
        cluster.apply(ISVC, {k: previous[k] for k in ("apiVersion", "kind", "spec")} |
                      {"metadata": {k: previous["metadata"][k] for k in ("name", "namespace", "labels", "annotations")
                                    if k in previous["metadata"]}})
        raise DeployFailed(f"{exc}; {name} restored to version {previous_version}") from None
    return {"deployed": True, "name": name, "namespace": ns, "role": role, "version": version,
            "served_model": served_name(cfg, version), "generation": isvc["metadata"]["generation"],
            "image": cfg.deploy.runtime_image, "image_digest": image_digest(cfg.deploy.runtime_image),
            "url": url, "previous_version": previous_version,
            "smoke": {"question": cfg.deploy.smoke_question, "answer": answer}}


def stage_adapter(cfg: Config, version: str, cache_root) -> str:
    """Copy the registered version's adapter onto the model-cache PVC (mounted at `cache_root`), where the
    InferenceService's --lora-modules points. Already there: left alone (versions are immutable)."""
    import shutil
    import tempfile
    from pathlib import Path

    from medtune import champion

    target = Path(cache_root) / adapter_path(cfg, version)
    if (target / "adapter_config.json").exists():
        return str(target)
    with tempfile.TemporaryDirectory(prefix="medtune-deploy-") as tmp:
        found, info = champion.fetch(cfg.tracking.registered_model, Path(tmp), cfg.model, version)
        if found is None:
            raise DeployFailed(info["reason"])
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{version}-"))
        shutil.copytree(found.adapter_dir, staging, dirs_exist_ok=True)
        staging.rename(target)  # whole or not at all: a half-copied adapter would load as a broken model
    return str(target)


def deploy_step(cfg: Config, registration: dict, cache_root) -> dict:
    """The pipeline's deploy step: a promoted version replaces the champion, a passed one is served as the
    challenger; or the reason nothing was deployed."""
    reason = skip_reason(cfg)
    if reason:
        return {"deployed": False, "skipped": reason}
    role = "champion" if registration.get("promoted") else "challenger"
    stage_adapter(cfg, registration["version"], cache_root)
    # The deployer's token (Secret `<service account>-token` as $K8S_TOKEN), not the pipeline runner's rights.
    token = os.environ.get("K8S_TOKEN")
    api = connect(IN_CLUSTER, token) if token else connect()
    return deploy(cfg, Cluster(api), registration["version"], role)
