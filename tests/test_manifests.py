"""manifests/: rendered the way `kustomize build` would, then validated against Kubernetes' own schemas.

No `kustomize` binary installs from the package registries this project uses (PyPI's kustomize bindings
need Python 3.14; Debian's kubectl is 1.20 with kustomize v2), so `render` below applies the handful of
kustomization fields these manifests use (resources, namespace, labels, images) and refuses any other
field, so a kustomization that grows past it fails here instead of being rendered wrong. When a real
`kustomize` is on PATH, the last test checks this renderer against it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from medtune import config as config_mod
from medtune import kubeflow

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "manifests"
PROFILE = ROOT / "configs" / "qwen2.5-0.5b-qlora.yaml"
K8S_VERSIONS = ("1.29.0", "1.33.0", "1.37.0")  # oldest and newest schemas kubernetes-validate ships, and one between
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "namespace", "labels", "images"}


def render(directory: Path) -> list[dict]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - SUPPORTED_FIELDS
    assert not unknown, f"{directory}: the test renderer does not implement {unknown}"
    objects: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    namespace = kustomization.get("namespace")
    for obj in objects:
        if namespace and obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace
            for subject in obj.get("subjects", []):
                if subject.get("kind") == "ServiceAccount":
                    subject["namespace"] = namespace
        for group in kustomization.get("labels", []):
            obj["metadata"].setdefault("labels", {}).update(group["pairs"])
        for image in kustomization.get("images", []):
            for container in _containers(obj):
                name, _, _ = container["image"].partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image['newTag']}"
    return objects


def _containers(obj: dict) -> list[dict]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


@pytest.fixture(scope="module")
def rendered() -> dict[tuple[str, str], dict]:
    objects = render(MANIFESTS)
    keyed = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert len(keyed) == len(objects), "two objects share a kind and name"
    return keyed


def test_every_object_is_valid_for_kubernetes(rendered):
    for obj in rendered.values():
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_validator_catches_a_broken_object(rendered):
    broken = yaml.safe_load(yaml.safe_dump(rendered[("Deployment", "mlflow")]))
    broken["spec"]["template"]["spec"]["containers"][0]["port"] = 5000  # a typo for `ports`
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSIONS[-1], strict=True)


def test_the_inventory(rendered):
    assert set(rendered) == {
        ("Namespace", "medtune"), ("PersistentVolumeClaim", "mlflow-data"), ("Deployment", "mlflow"),
        ("Service", "mlflow"), ("ServiceAccount", "medtune-pipeline-runner"), ("Role", "medtune-pipeline-runner"),
        ("RoleBinding", "medtune-pipeline-runner"), ("PersistentVolumeClaim", "medtune-model-cache"),
        ("PersistentVolumeClaim", "medtune-data"), ("Job", "medtune-model-cache-init"),
        ("ConfigMap", "mlflow-auth"), ("NetworkPolicy", "mlflow"),
    }
    assert all(o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "medtune" for o in rendered.values())


def test_names_match_the_cluster_profile(rendered):
    cfg = config_mod.load(PROFILE)
    runs_ns = rendered[("ServiceAccount", cfg.cluster.service_account)]["metadata"]["namespace"]
    assert runs_ns == "kubeflow"  # where standalone KFP runs pipelines
    assert rendered[("PersistentVolumeClaim", cfg.cluster.model_cache_pvc)]["metadata"]["namespace"] == runs_ns
    assert rendered[("PersistentVolumeClaim", cfg.cluster.data_pvc)]["metadata"]["namespace"] == runs_ns
    binding = rendered[("RoleBinding", "medtune-pipeline-runner")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": cfg.cluster.service_account,
                                    "namespace": runs_ns}]
    assert binding["roleRef"]["name"] == rendered[("Role", "medtune-pipeline-runner")]["metadata"]["name"]
    # tracking.tracking_uri is the MLflow Service's cluster DNS name and port.
    service = rendered[("Service", "mlflow")]
    assert cfg.tracking.tracking_uri == \
        f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:" \
        f"{service['spec']['ports'][0]['port']}"
    deployment = rendered[("Deployment", "mlflow")]
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert f"mlflow.medtune.svc.cluster.local:{service['spec']['ports'][0]['port']}" in \
        env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")


def test_mlflow_server_runs_non_root_on_its_volume(rendered):
    deployment = rendered[("Deployment", "mlflow")]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["fsGroup"] == 1000
    container = pod["containers"][0]
    assert container["image"] == config_mod.load(PROFILE).cluster.cpu_image
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"
    assert {"name": "data", "mountPath": "/mlflow"} in container["volumeMounts"]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "mlflow-data"
    backend = next(e for e in container["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI")
    assert backend["valueFrom"]["secretKeyRef"] == {"name": "mlflow-backend", "key": "uri", "optional": True}
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def _grants(rules: list[dict]) -> set[tuple]:
    """(api group, resource, verb, resource name or "*") for every combination a Role's rules grant."""
    return {(g, res, v, name) for r in rules for g in r["apiGroups"] for res in r["resources"] for v in r["verbs"]
            for name in r.get("resourceNames") or ["*"]}


def test_runner_role_grants_only_what_the_task_pods_call(rendered):
    rules = rendered[("Role", "medtune-pipeline-runner")]["rules"]
    assert all("*" not in r["verbs"] and "*" not in r["resources"] and "*" not in r["apiGroups"] for r in rules)
    assert _grants(rules) == {
        ("", "configmaps", "get", "kfp-launcher"), ("", "configmaps", "get", "metadata-grpc-configmap"),
        ("", "secrets", "get", "mlpipeline-minio-artifact"),  # the artifact store's, by name only
        ("", "pods", "get", "*"), ("", "pods", "watch", "*"), ("", "pods", "patch", "*"), ("", "pods/log", "get", "*"),
        ("argoproj.io", "workflowtaskresults", "create", "*"), ("argoproj.io", "workflowtaskresults", "patch", "*"),
    }
    cfg = config_mod.load(PROFILE)
    readable = {name for _, res, _, name in _grants(rules) if res == "secrets"}
    assert not readable & {cfg.cluster.hf_secret, cfg.cluster.mlflow_secret, "*"}, \
        "the pods get medtune's Secrets from the kubelet; the account must not read them (or any other)"
    assert not {v for _, res, v, _ in _grants(rules) if res == "persistentvolumeclaims"}, "runs create no PVCs"


def test_mlflow_requires_a_login_with_the_admin_from_a_secret(rendered):
    container = rendered[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    command = " ".join(container["args"])
    assert command.startswith("exec mlflow server --app-name basic-auth ")
    env = {e["name"]: e for e in container["env"]}
    for name, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "username"), ("MLFLOW_AUTH_ADMIN_PASSWORD", "password"),
                      ("MLFLOW_FLASK_SERVER_SECRET_KEY", "flask-secret-key")):
        # not optional: a server without its admin Secret must not start (and serve without login)
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-admin", "key": key}, name
    assert not any("value" in e and "PASSWORD" in e["name"] for e in container["env"])
    config_dir = env["MLFLOW_AUTH_CONFIG_PATH"]["value"].rpartition("/")[0]
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == config_dir)
    assert mount["readOnly"] is True
    volume = next(v for v in rendered[("Deployment", "mlflow")]["spec"]["template"]["spec"]["volumes"]
                  if v["name"] == mount["name"])
    import configparser

    ini = configparser.ConfigParser()
    ini.read_string(rendered[("ConfigMap", volume["configMap"]["name"])]["data"]["basic_auth.ini"])
    assert ini["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert ini["mlflow"]["database_uri"] == "sqlite:////mlflow/basic_auth.db", "the user store on the PVC"
    assert "admin_password" not in ini["mlflow"], "the password comes from the Secret only"


def test_network_policy_admits_only_the_pipeline_pods(rendered):
    from medtune.pipeline import MLFLOW_CLIENT_LABEL

    policy = rendered[("NetworkPolicy", "mlflow")]
    deployment = rendered[("Deployment", "mlflow")]
    assert policy["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    runs_ns = rendered[("ServiceAccount", "medtune-pipeline-runner")]["metadata"]["namespace"]
    # one peer with both selectors: pods with the label AND in the runs' namespace (two peers would be OR)
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": runs_ns}},
                             "podSelector": {"matchLabels": dict([MLFLOW_CLIENT_LABEL])}}]
    service = rendered[("Service", "mlflow")]
    assert rule["ports"] == [{"protocol": "TCP", "port": service["spec"]["ports"][0]["port"]}]
    assert "port-forward" in (MANIFESTS / "mlflow" / "networkpolicy.yaml").read_text(), "why it needs no rule"


def test_secret_templates_are_valid_hold_no_values_and_are_not_applied(rendered):
    templates = sorted((MANIFESTS / "secrets").glob("*.yaml"))
    assert {p.stem for p in templates} == {"hf-token", "hf-read-token", "mlflow-credentials", "mlflow-backend",
                                           "mlflow-admin"}
    cfg = config_mod.load(PROFILE)
    names = set()
    for path in templates:
        secret = yaml.safe_load(path.read_text())
        kubernetes_validate.validate(secret, K8S_VERSIONS[-1], strict=True)
        assert "data" not in secret and all(value == "" for value in secret["stringData"].values()), path
        names.add(secret["metadata"]["name"])
    assert {cfg.cluster.hf_secret, cfg.cluster.hf_read_secret, cfg.cluster.mlflow_secret, "mlflow-admin"} <= names
    assert not any(kind == "Secret" for kind, _ in rendered)  # an apply -k must not blank real values


def test_recurring_run_definition_is_what_schedule_reads():
    spec = kubeflow.load_schedule(MANIFESTS / "recurring-run.yaml")
    assert spec.cron == "0 0 3 * * 1" and spec.max_concurrency == 1 and spec.no_catchup
    assert (ROOT / spec.profile).resolve() == PROFILE


@pytest.mark.skipif(shutil.which("kustomize") is None, reason="no kustomize binary on PATH (see module docstring)")
def test_renderer_agrees_with_kustomize(rendered):
    out = subprocess.run(["kustomize", "build", str(MANIFESTS)], capture_output=True, text=True, check=True).stdout
    real = {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(out) if o}
    assert real == rendered


# --- images/: read here; scripts/test-images builds the CPU image with podman and runs the DAG in it.

IMAGES = ROOT / "images"
DOCKERFILE = IMAGES / "Dockerfile"
VARIANTS = {"cpu": ("python:3.12.12-slim-bookworm", "cpu"), "cuda": ("nvidia/cuda:13.0.2-base-ubuntu24.04", "cu130")}


def _args(dockerfile: Path) -> dict[str, str]:
    import re

    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile.read_text(), re.M))


def _pins(path: Path) -> dict[str, str]:
    import re

    return {m[1].lower().replace("_", "-").replace(".", "-"): m[2]
            for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", path.read_text(), re.M)}


def _dry_run(*args: str) -> list[str]:
    env = {"PATH": "/usr/bin:/bin", "REGISTRY": "registry.example/ml", "HOME": str(ROOT), "DOCKER": "docker"}
    return subprocess.run(["bash", str(IMAGES / "build.sh"), "--dry-run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True).stdout.splitlines()


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_builds_from_a_pinned_and_locked_base(variant):
    import re

    base, _ = VARIANTS[variant]
    assert re.search(r":\d+\.\d+\.\d+-", base), f"{base}: pin an exact release, not a floating tag"
    assert re.findall(r"^FROM (.+)$", DOCKERFILE.read_text(), re.M) == ["${BASE_IMAGE}"]
    locked = dict(line.split() for line in (IMAGES / "bases.lock").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    assert locked[base] == "-" or re.fullmatch(r"sha256:[0-9a-f]{64}", locked[base])
    build = next(line for line in _dry_run("--variant", variant) if " build " in line)
    expected = base if locked[base] == "-" else f"{base}@{locked[base]}"
    assert f"--build-arg BASE_IMAGE={expected} " in build and f"--build-arg VARIANT={variant} " in build


def test_dockerfile_runs_as_non_root_with_the_pipeline_paths():
    import re

    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (.+)$", text, re.M)
    assert users == ["1000:1000"], "one numeric non-root USER, so runAsNonRoot can verify it"
    assert "useradd --uid 1000 --gid 1000" in text
    assert "HOME=/home/medtune" in text
    from medtune.pipeline import HF_CACHE

    assert HF_CACHE.startswith("/home/medtune/") and HF_CACHE in text  # created and owned by the user
    assert config_mod.load(PROFILE).model.cache_dir in text.split()  # /models exists for the PVC mount


def test_every_package_installs_by_hash_at_the_constraints_version():
    import re

    text = DOCKERFILE.read_text()
    installs = re.findall(r"pip install[^\n]*", text)
    assert "--require-hashes" in installs[0] and "-r /tmp/torch-wheel/torch.txt" in text
    assert '-r "/tmp/images/requirements-${VARIANT}.txt"' in text
    assert "--no-deps --no-index" in installs[1]  # medtune itself: nothing fetched beyond the hashed list
    assert "COPY images/constraints.txt /etc/medtune/constraints.txt" in text
    assert "MEDTUNE_LOCK=/etc/medtune/constraints.txt" in text  # the lineage record hashes it
    assert f"ARG MEDTUNE_VERSION={_project_version()}" in text
    pins = _pins(IMAGES / "constraints.txt")
    for variant in VARIANTS:
        listed = re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)",
                            (IMAGES / f"requirements-{variant}.txt").read_text(), re.M)
        assert listed and all(pins[name] == version for name, version, _ in listed)
        assert "torch" not in {name for name, _, _ in listed}  # from the variant's wheel, hashed by build.sh
    cpu = {name for name, *_ in re.findall(r"^([A-Za-z0-9_.-]+)==", (IMAGES / "requirements-cpu.txt").read_text(), re.M)}
    assert not {n for n in cpu if n.startswith(("nvidia-", "cuda-")) or n == "triton"}


def test_torch_wheels_are_locked_by_sha256():
    import re

    lines = [line.split() for line in (IMAGES / "torch.lock").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    version = _pins(IMAGES / "constraints.txt")["torch"]
    assert lines and all(re.fullmatch(rf"torch-{re.escape(version)}\+(cpu|cu130)-cp3\d+-.*\.whl", name)
                         and re.fullmatch(r"sha256:[0-9a-f]{64}", digest) for name, digest in lines)


def _project_version() -> str:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_constraints_pin_every_dependency_at_the_tested_versions():
    import re
    import tomllib

    pins = _pins(IMAGES / "constraints.txt")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", d)[0].lower().replace("_", "-") for d in deps}
    assert names <= set(pins), f"not pinned: {names - set(pins)} (run `make constraints`)"
    tested = _pins(ROOT / "requirements.lock")
    drift = {n: (pins[n], tested[n]) for n in set(pins) & set(tested) if pins[n] != tested[n]}
    assert not drift, f"images/constraints.txt differs from requirements.lock: {drift}"


def test_build_script_tags_version_and_git_sha():
    import re

    builds = [line for line in _dry_run() if " build " in line]
    assert len(builds) == 2
    version = _project_version()
    for variant, line in zip(("cpu", "cuda"), builds):
        assert "--file images/Dockerfile " in line
        assert f"--tag registry.example/ml/medtune-{variant}:{version} " in line
        assert re.search(rf"--tag registry\.example/ml/medtune-{variant}:{version}-[0-9a-f]{{12}}(-dirty)? ", line)
        assert re.search(r"--build-arg GIT_SHA=[0-9a-f]{40} ", line)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^images:.*\n\t.*images/build\.sh$", makefile, re.M)


def test_pushed_digests_are_pinned_in_the_profile_compiled_dag_and_mlflow_manifest(tmp_path):
    """What `images/build.sh --push` writes after a push (the digests here are made up: no registry)."""
    from medtune import images
    from medtune.pipeline import compile_pipeline

    refs = {"cpu": "registry.example/ml/medtune-cpu:0.1.0@sha256:" + "a" * 64,
            "cuda": "registry.example/ml/medtune-cuda:0.1.0@sha256:" + "b" * 64}
    profile = shutil.copy(PROFILE, tmp_path / "profile.yaml")
    mlflow_dir = shutil.copytree(MANIFESTS / "mlflow", tmp_path / "mlflow")
    images.pin(refs, Path(profile), mlflow_dir / "kustomization.yaml")

    cfg = config_mod.load(Path(profile))
    assert (cfg.cluster.cpu_image, cfg.cluster.cuda_image) == (refs["cpu"], refs["cuda"])
    assert "# The defaults fit manifests/" in Path(profile).read_text()  # comments kept
    dag = next(yaml.safe_load_all(compile_pipeline(Path(profile), tmp_path / "medtune.yaml").read_text()))
    used = {e["container"]["image"] for e in dag["deploymentSpec"]["executors"].values()}
    assert used == set(refs.values())
    deployment = next(o for o in render(mlflow_dir) if o["kind"] == "Deployment")
    assert [c["image"] for c in _containers(deployment)] == [refs["cpu"]]
    with pytest.raises(ValueError, match="pin by digest"):
        images.pin({"cpu": "registry.example/ml/medtune-cpu:0.1.0"}, Path(profile), mlflow_dir / "kustomization.yaml")


def test_base_images_in_manifests_follow_bases_lock():
    locked = dict(line.split() for line in (IMAGES / "bases.lock").read_text().splitlines()
                  if line.strip() and not line.startswith("#"))
    job = yaml.safe_load((MANIFESTS / "runs" / "cache-init-job.yaml").read_text())
    [image] = [c["image"] for c in _containers(job)]
    tag = image.split("@")[0]
    assert tag in locked and image == (tag if locked[tag] == "-" else f"{tag}@{locked[tag]}")


def test_the_deployments_mlflow_command_requires_a_login(rendered, tmp_path):
    """The Deployment's own command line, env and auth config, run here on loopback (paths and port moved):
    no request but /health without a login; the admin from the Secret's keys creates the pipeline's user;
    a user nobody granted anything sees nothing of the pipeline's experiment (NO_PERMISSIONS)."""
    import os
    import sys
    import time
    import urllib.error
    import urllib.request

    import mlflow
    import psutil
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    from medtune.local_server import _listening_port, _stop

    deployment = rendered[("Deployment", "mlflow")]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    command = container["args"][0].replace("/mlflow/", f"{tmp_path}/")
    command = command.replace("--host 0.0.0.0 --port 5000 --workers 2", "--host 127.0.0.1 --port 0 --workers 1")
    command = command.replace("exec mlflow ", f"exec {sys.executable} -m mlflow ")
    ini = rendered[("ConfigMap", "mlflow-auth")]["data"]["basic_auth.ini"].replace("////mlflow/", f"///{tmp_path}/")
    (tmp_path / "basic_auth.ini").write_text(ini)
    secret = {"username": "admin-ops", "password": "admin-pw-9c2e", "flask-secret-key": "k" * 32}
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini"),
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    for e in container["env"]:
        if "secretKeyRef" in e.get("valueFrom", {}) and e["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin":
            env[e["name"]] = secret[e["valueFrom"]["secretKeyRef"]["key"]]
    server = subprocess.Popen(["/bin/sh", "-c", command], env=env, start_new_session=True,
                              stdout=open(tmp_path / "log", "wb"), stderr=subprocess.STDOUT)
    try:
        deadline, uri = time.monotonic() + 180, None
        while uri is None or urllib.request.urlopen(f"{uri}/health", timeout=5).status != 200:
            assert server.poll() is None and time.monotonic() < deadline, (tmp_path / "log").read_text()[-3000:]
            port = _listening_port(psutil.Process(server.pid))
            uri = f"http://127.0.0.1:{port}" if port else None
            time.sleep(1)
        with pytest.raises(urllib.error.HTTPError) as anonymous:
            urllib.request.urlopen(f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=5)
        assert anonymous.value.code == 401

        os.environ.update(MLFLOW_TRACKING_USERNAME=secret["username"], MLFLOW_TRACKING_PASSWORD=secret["password"])
        try:
            admin = get_app_client("basic-auth", tracking_uri=uri)
            admin.create_user("medtune-pipeline", "pipeline-pw-51aa")
            admin.create_user("someone", "someone-pw-07bd")
            os.environ.update(MLFLOW_TRACKING_USERNAME="medtune-pipeline", MLFLOW_TRACKING_PASSWORD="pipeline-pw-51aa")
            experiment = mlflow.MlflowClient(uri).create_experiment("medtune")
            os.environ.update(MLFLOW_TRACKING_USERNAME="someone", MLFLOW_TRACKING_PASSWORD="someone-pw-07bd")
            with pytest.raises(MlflowException, match="Permission denied"):
                mlflow.MlflowClient(uri).get_experiment(experiment)
        finally:
            for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                os.environ.pop(key, None)
    finally:
        _stop(server.pid, psutil.Process(server.pid).create_time())


def test_every_runtime_dependency_is_pinned_for_the_images():
    """A dependency added to pyproject.toml but not to images/constraints.txt fails the image build's pip check."""
    import re
    import tomllib

    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {canonicalize_name(re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0]) for dep in project["dependencies"]}
    pins = {canonicalize_name(name) for name in _pins(IMAGES / "constraints.txt")}
    for variant in VARIANTS:
        listed = {canonicalize_name(n) for n in re.findall(r"^([A-Za-z0-9_.-]+)==",
                                                           (IMAGES / f"requirements-{variant}.txt").read_text(), re.M)}
        assert wanted - {"torch"} <= listed, f"{variant}: missing {sorted(wanted - {'torch'} - listed)}"
    assert wanted <= pins, f"not in images/constraints.txt: {sorted(wanted - pins)}"
