"""Golden tests on the committed pipelines/medtune.yaml: what Kubeflow will run, read from the IR itself.

Expected values come from the cluster profile (configs/qwen2.5-0.5b-qlora.yaml) and the step specs
(medtune/steps/<step>.py), so the tests say "the compiled YAML does what the profile and the steps ask",
and a few literals pin the behaviour itself (which tasks get the GPU, the Hub token, retries); one test
checks the committed file is a fresh compile.
"""

import json
import re
from pathlib import Path

import pytest
import yaml

from medtune import config as config_mod
from medtune import pipeline as pipeline_mod
from medtune import steps

ROOT = Path(__file__).resolve().parent.parent
COMPILED = ROOT / "pipelines" / "medtune.yaml"
PROFILE = ROOT / "configs" / "qwen2.5-0.5b-qlora.yaml"
TASKS = ("open_run", "validate_data", "preprocess", "trials", "train", "select", "finish", "preference", "evaluate",
         "gate", "register", "push", "deploy", "audit", "audit_2")
SPECS = steps.specs()


def spec_of(task: str) -> steps.StepSpec:
    return SPECS[task.removesuffix("_2")]  # audit_2: the audit in the branch where the gate failed


def _docs(path: Path) -> tuple[dict, dict]:
    spec, platform = yaml.safe_load_all(path.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.fixture(scope="module")
def cfg() -> config_mod.Config:
    return config_mod.load(PROFILE)


@pytest.fixture(scope="module")
def compiled() -> dict:
    spec, platform = _docs(COMPILED)
    tasks = dict(spec["root"]["dag"]["tasks"])
    tasks.update(spec["components"]["comp-for-loop-1"]["dag"]["tasks"])  # one train task per sweep trial
    tasks.update(spec["components"]["comp-condition-3"]["dag"]["tasks"])  # the gate passed
    tasks.update(spec["components"]["comp-condition-4"]["dag"]["tasks"])  # it did not
    by_name = {}
    for name in TASKS:
        task = tasks[name.replace("_", "-")]
        executor = spec["components"][task["componentRef"]["name"]]["executorLabel"]
        by_name[name] = {"task": task, "executor": executor,
                         "container": spec["deploymentSpec"]["executors"][executor]["container"],
                         "k8s": platform.get(executor, {})}
    return {"spec": spec, "tasks": by_name, "text": COMPILED.read_text()}


def test_committed_yaml_is_a_fresh_compile(tmp_path):
    fresh = pipeline_mod.compile_pipeline(PROFILE, tmp_path / "medtune.yaml")
    assert fresh.read_text() == COMPILED.read_text(), "pipelines/medtune.yaml is stale: run `medtune compile`"


def test_gpu_request_selector_and_toleration_only_on_gpu_tasks(compiled, cfg):
    cluster = cfg.cluster
    assert {name for name, spec in SPECS.items() if spec.gpu} == {"train", "finish", "preference", "evaluate"}
    for name, t in compiled["tasks"].items():
        resources, k8s = t["container"]["resources"], t["k8s"]
        if spec_of(name).gpu:
            assert resources["accelerator"] == {"count": "1", "resourceCount": "1", "resourceType": "nvidia.com/gpu",
                                               "type": "nvidia.com/gpu"}
            assert t["container"]["image"] == cluster.cuda_image
            assert k8s["nodeSelector"] == {"labels": {"nvidia.com/gpu.present": "true"}}
            assert k8s["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
            expected = cluster.gpu_resources
        else:
            assert "accelerator" not in resources, name
            assert t["container"]["image"] == cluster.cpu_image
            assert "nodeSelector" not in k8s and "tolerations" not in k8s, name
            expected = cluster.cpu_resources
        assert (resources["resourceCpuRequest"], resources["resourceCpuLimit"]) == (expected.cpu, expected.cpu)
        assert (resources["resourceMemoryRequest"], resources["resourceMemoryLimit"]) == \
            (expected.memory, expected.memory)
    assert compiled["tasks"]["train"]["container"]["resources"]["resourceMemoryLimit"] == "48Gi"


def test_secrets_are_referenced_by_name_with_no_values(compiled, cfg):
    mlflow = {"secretName": "medtune-mlflow", "optional": True,
              "keyToEnv": [{"envVar": "MLFLOW_TRACKING_USERNAME", "secretKey": "username"},
                           {"envVar": "MLFLOW_TRACKING_PASSWORD", "secretKey": "password"}]}
    deployer = {"secretName": "medtune-deployer-token", "optional": True,
                "keyToEnv": [{"envVar": "K8S_TOKEN", "secretKey": "token"}]}
    for name, t in compiled["tasks"].items():
        refs = t["k8s"].get("secretAsEnv", [])
        # A reference holds the Secret's name, its keys and env var names: there is no field for a value.
        assert all(set(ref) == {"secretName", "secretNameParameter", "keyToEnv", "optional"} for ref in refs)
        assert all(ref["secretNameParameter"] == {"runtimeValue": {"constant": ref["secretName"]}} for ref in refs)
        found = [{k: ref[k] for k in ("secretName", "optional", "keyToEnv")} for ref in refs]
        # the MLflow login; the deploy step also acts on the cluster as the deployer (kserve.rbac), not with the
        # pipeline runner's rights
        assert found == [mlflow] * spec_of(name).mlflow + [deployer] * spec_of(name).deployer_token, name
        # the only plain env: the image the pod runs, which the step records (Secrets come by reference)
        assert t["container"]["env"] == [{"name": "MEDTUNE_IMAGE", "value": t["container"]["image"]}], name
    assert {name for name, spec in SPECS.items() if spec.deployer_token} == {"deploy"}
    assert {name for name, spec in SPECS.items() if not spec.mlflow} == {"trials"}  # it only expands the config
    assert not re.search(r"^kind: Secret", compiled["text"], re.M)


def test_the_hub_write_token_is_a_file_in_the_push_pod_only(compiled, cfg):
    """Only `push` writes to the Hub; the downloading tasks get the optional read-only token; both as a file
    named by $HF_TOKEN_PATH (huggingface_hub reads it), which a pod-only env var points at."""
    token_path = f"{pipeline_mod.HF_TOKEN_DIR}/token"
    for name, t in compiled["tasks"].items():
        volumes = [{k: v[k] for k in ("secretName", "mountPath", "optional")} for v in t["k8s"].get("secretAsVolume", [])]
        expected = {"write": cfg.cluster.hf_secret, "read": cfg.cluster.hf_read_secret}.get(
            spec_of(name).hub_token)
        if expected is None:
            assert volumes == [], name
            assert "hf-token-path" not in json.dumps(t["k8s"].get("podMetadata", {})), name
            continue
        assert volumes == [{"secretName": expected, "mountPath": pipeline_mod.HF_TOKEN_DIR, "optional": True}], name
        assert {"fieldPath": "metadata.annotations['medtune.io/hf-token-path']", "name": "HF_TOKEN_PATH"} in \
            t["k8s"]["fieldPathAsEnv"]
        assert t["k8s"]["podMetadata"]["annotations"]["medtune.io/hf-token-path"] == token_path
    assert [n for n, t in compiled["tasks"].items()
            if any(v["secretName"] == cfg.cluster.hf_secret for v in t["k8s"].get("secretAsVolume", []))] == ["push"]
    assert {name for name, spec in SPECS.items() if spec.hub_token == "read"} == {
        "validate_data", "preprocess", "train", "finish", "preference", "evaluate"}


def test_endpoints_are_pinned_at_compile_time_and_pods_carry_the_mlflow_client_label(compiled, cfg):
    from medtune import pins

    key, value = pipeline_mod.MLFLOW_CLIENT_LABEL
    for name, t in compiled["tasks"].items():
        metadata = t["k8s"]["podMetadata"]
        # only pods that talk to MLflow may reach it (the NetworkPolicy admits the label)
        assert metadata.get("labels", {}).get(key) == (value if spec_of(name).mlflow else None), name
        assert json.loads(metadata["annotations"]["medtune.io/pinned"]) == json.loads(pins.of(cfg)) == {
            "tracking.tracking_uri": cfg.tracking.tracking_uri, "hub.endpoint": cfg.hub.endpoint,
            "hub.token_env": cfg.hub.token_env}
        assert {"fieldPath": "metadata.annotations['medtune.io/pinned']", "name": pins.ENV} in \
            t["k8s"]["fieldPathAsEnv"]


def test_no_secret_value_reaches_the_compiled_yaml(tmp_path, monkeypatch):
    sentinels = {"HF_TOKEN": "hf_sentinel_5b1c9e", "MLFLOW_TRACKING_PASSWORD": "mlflow-sentinel-77a1",
                 "MLFLOW_TRACKING_USERNAME": "user-sentinel-3f0d", "KFP_TOKEN": "kfp-sentinel-91c2"}
    for key, value in sentinels.items():
        monkeypatch.setenv(key, value)
    text = pipeline_mod.compile_pipeline(PROFILE, tmp_path / "p.yaml").read_text()
    assert not [v for v in sentinels.values() if v in text]


def test_retries_and_timeouts_as_the_steps_declare(compiled, cfg):
    assert cfg.cluster.retries == {} and cfg.cluster.timeouts_s == {}, "the profile keeps the steps' defaults"
    assert {name for name, spec in SPECS.items() if spec.retry} == {"validate_data", "preprocess", "train", "finish",
                                                                     "preference", "register", "push", "audit"}
    for task, t in compiled["tasks"].items():
        spec = spec_of(task)
        policy = t["task"].get("retryPolicy")
        if spec.retry:
            r = spec.retry
            assert policy == {"maxRetryCount": r.retries, "backoffDuration": f"{r.backoff_s}s",
                              "backoffFactor": r.backoff_factor, "backoffMaxDuration": f"{r.backoff_max_s}s"}
        else:
            assert policy is None, task
        assert int(t["k8s"]["activeDeadlineSeconds"]) == spec.timeout_s
    assert compiled["tasks"]["push"]["task"]["retryPolicy"]["maxRetryCount"] == 3
    assert int(compiled["tasks"]["train"]["k8s"]["activeDeadlineSeconds"]) == 6 * 3600


def test_no_task_is_cached(compiled):
    # a cached step would skip its MLflow logging and could reuse the validation of changed data
    assert len(compiled["tasks"]) == len(TASKS) == 15
    assert all(t["task"]["cachingOptions"] == {} for t in compiled["tasks"].values())


def test_gate_branches_register_push_and_audit_or_audit_only(compiled):
    spec = compiled["spec"]
    root = spec["root"]["dag"]["tasks"]
    assert not {"register", "push", "deploy", "audit"} & set(root)
    branches = spec["components"]["comp-condition-branches-2"]["dag"]["tasks"]
    passed = "inputs.parameter_values['pipelinechannel--gate-Output'] == true"
    assert branches["condition-3"]["triggerPolicy"]["condition"] == passed
    assert branches["condition-4"]["triggerPolicy"]["condition"] == f"!({passed})"
    assert root["condition-branches-2"]["inputs"]["parameters"]["pipelinechannel--gate-Output"][
        "taskOutputParameter"] == {"outputParameterKey": "Output", "producerTask": "gate"}
    promoted = spec["components"]["comp-condition-3"]["dag"]["tasks"]
    assert set(promoted) == {"register", "push", "deploy", "audit"}  # deploy only when the gate passed
    assert set(spec["components"]["comp-condition-4"]["dag"]["tasks"]) == {"audit-2"}
    # The DAG order: each step consumes the previous one's outputs.
    assert set(root["for-loop-1"]["dependentTasks"]) >= {"preprocess", "trials"}
    assert set(root["select"]["dependentTasks"]) == {"for-loop-1", "open-run"}
    assert set(root["finish"]["dependentTasks"]) >= {"select", "preprocess"}
    assert set(root["preference"]["dependentTasks"]) >= {"finish", "preprocess"}
    assert set(root["evaluate"]["dependentTasks"]) >= {"preference", "finish", "preprocess"}
    assert set(root["gate"]["dependentTasks"]) >= {"evaluate", "preference", "finish"}
    assert promoted["push"]["dependentTasks"] == ["register"], "the Hub tag names the registered version"
    assert sorted(promoted["deploy"]["dependentTasks"]) == ["push", "register"], "served once registered and pushed"
    assert sorted(promoted["audit"]["dependentTasks"]) == ["deploy", "push", "register"]


def test_audit_receives_every_artifact_of_the_run(compiled):
    spec = compiled["spec"]
    produced = {(task, key) for task, t in spec["root"]["dag"]["tasks"].items()
                if not task.startswith(("condition", "for-loop"))
                for key in spec["components"][t["componentRef"]["name"]].get("outputDefinitions", {})
                .get("artifacts", {})}
    produced -= {("select", "metrics"), ("finish", "metrics"), ("preference", "metrics"), ("evaluate", "base_metrics"),
                 ("evaluate", "candidate_metrics")}  # in comparison, history and the preference summary, which are
    # audited; every trial's adapter hash is in the trials table

    def sources(task: dict) -> set:  # "<producer task>-<output>" for each artifact the task reads
        return {a["componentInputArtifact"].removeprefix("pipelinechannel--") if "componentInputArtifact" in a
                else "{producerTask}-{outputArtifactKey}".format(**a["taskOutputArtifact"])
                for a in task["inputs"]["artifacts"].values()}

    rejected = sources(compiled["tasks"]["audit_2"]["task"])
    assert rejected == {f"{task}-{key}" for task, key in produced}
    promoted = sources(compiled["tasks"]["audit"]["task"])
    assert promoted == rejected | {"register-registration", "push-hub_push", "deploy-deployment"}


def test_train_fans_out_over_the_trials_and_select_collects_every_trial(compiled, cfg):
    spec = compiled["spec"]
    loop = spec["root"]["dag"]["tasks"]["for-loop-1"]
    assert loop["parameterIterator"] == {"itemInput": "pipelinechannel--trials-Output-loop-item",
                                         "items": {"inputParameter": "pipelinechannel--trials-Output"}}
    assert loop["inputs"]["parameters"]["pipelinechannel--trials-Output"]["taskOutputParameter"] == {
        "outputParameterKey": "Output", "producerTask": "trials"}
    assert loop["iteratorPolicy"] == {"parallelismLimit": cfg.sweep.parallelism}
    assert compiled["tasks"]["train"]["task"]["inputs"]["parameters"]["trial"] == {
        "componentInputParameter": "pipelinechannel--trials-Output-loop-item"}
    # dsl.Collected: the loop exposes each train output as a list, and select reads the lists
    loop_outputs = spec["components"]["comp-for-loop-1"]["dag"]["outputs"]["artifacts"]
    select = compiled["tasks"]["select"]["task"]["inputs"]["artifacts"]
    select_inputs = spec["components"]["comp-select"]["inputDefinitions"]["artifacts"]
    for name, output in (("outcomes", "outcome"), ("adapters", "adapter"), ("histories", "history"),
                         ("checkpoints", "checkpoint")):
        assert loop_outputs[f"pipelinechannel--train-{output}"]["artifactSelectors"] == [
            {"outputArtifactKey": output, "producerSubtask": "train"}]
        assert select[name]["taskOutputArtifact"] == {"outputArtifactKey": f"pipelinechannel--train-{output}",
                                                      "producerTask": "for-loop-1"}
        assert select_inputs[name]["isArtifactList"] is True
    # only the winner goes on, through finish (the rest of a screened winner's steps, or a pass-through) and the
    # preference step (DPO or a pass-through): evaluate, gate, register and push read its adapter/history, never
    # train's; evaluate also reads the winner's finished (SFT-only) adapter
    for consumer, inputs, producer in (("finish", ["sft_adapter", "sft_history", "checkpoint", "trials_in"], "select"),
                                       ("preference", ["sft_adapter", "sft_history"], "finish"),
                                       ("evaluate", ["sft_adapter"], "finish"), ("gate", ["trials"], "finish"),
                                       ("evaluate", ["adapter"], "preference"), ("gate", ["history"], "preference"),
                                       ("register", ["adapter"], "preference"), ("push", ["adapter"], "preference")):
        artifacts = compiled["tasks"][consumer]["task"]["inputs"]["artifacts"]
        for name in inputs:
            source = artifacts[name].get("taskOutputArtifact") or artifacts[name]["componentInputArtifact"]
            assert producer in json.dumps(source), (consumer, name)


def test_a_larger_parallelism_is_compiled_into_the_loop(tmp_path):
    profile = tmp_path / "p.yaml"
    tree = yaml.safe_load(PROFILE.read_text())
    tree["sweep"] = {"grid": {"learning_rate": [1e-4, 3e-4, 1e-3]}, "parallelism": 2}
    profile.write_text(yaml.safe_dump(tree))
    spec, platform = _docs(pipeline_mod.compile_pipeline(profile, tmp_path / "m.yaml"))
    assert spec["root"]["dag"]["tasks"]["for-loop-1"]["iteratorPolicy"] == {"parallelismLimit": 2}
    train = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]["train"]
    executor = spec["components"][train["componentRef"]["name"]]["executorLabel"]
    assert platform[executor]["tolerations"]  # every trial task on the GPU pool


def test_pvcs_model_cache_on_model_tasks_and_data_on_validation(compiled, cfg):
    assert cfg.model.cache_dir == "/models"
    assert cfg.data.path.startswith(cfg.cluster.data_mount + "/")  # the data PVC holds data.path
    for name, t in compiled["tasks"].items():
        mounts = [(m["constant"], m["mountPath"], m.get("subPath", "")) for m in t["k8s"].get("pvcMount", [])]
        assert spec_of(name).model_cache == (name in ("preprocess", "train", "finish", "preference", "evaluate",
                                                      "deploy", "audit", "audit_2"))
        model_cache = [("medtune-model-cache", "/models", ""),
                       ("medtune-model-cache", pipeline_mod.HF_CACHE, "huggingface")]
        if name == "preference":  # the base model, and a preference dataset on the data PVC
            assert mounts == [*model_cache, ("medtune-data", "/data", "")]
        elif spec_of(name).model_cache:
            assert mounts == model_cache
        elif name == "validate_data":
            assert mounts == [("medtune-data", "/data", "")]
        else:
            assert mounts == [], name


def test_display_names(compiled):
    assert compiled["tasks"]["train"]["task"]["taskInfo"]["name"] == "Train LoRA/QLoRA adapter"
    assert {name: t["task"]["taskInfo"]["name"] for name, t in compiled["tasks"].items()} == \
        {name: spec_of(name).display_name for name in TASKS}


def test_default_config_parameter_is_the_profile(compiled, cfg):
    default = compiled["spec"]["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert config_mod.from_json(default) == cfg.runtime()
    assert "cluster" not in json.loads(default), "cluster settings are compiled in, not passed to a run"


def test_images_pinned_by_digest_when_the_profile_has_one(tmp_path):
    digest = "sha256:" + "ab" * 32
    tree = yaml.safe_load(PROFILE.read_text())
    tree["cluster"]["cuda_image"] = f"registry.example:5000/ml/medtune-cuda:0.1.0-abc123@{digest}"
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(tree))
    spec, _ = _docs(pipeline_mod.compile_pipeline(profile, tmp_path / "p.yaml"))
    images = {k: v["container"]["image"] for k, v in spec["deploymentSpec"]["executors"].items()}
    assert images["exec-train"] == images["exec-evaluate"] == f"registry.example:5000/ml/medtune-cuda:0.1.0-abc123@{digest}"
    assert images["exec-gate"] == "ghcr.io/medtune/medtune-cpu:0.1.0"


@pytest.mark.parametrize("ref", ["ghcr.io/medtune/medtune-cuda", "ghcr.io/medtune/medtune-cuda:latest",
                                 "ghcr.io/medtune/medtune-cuda:1.0@sha256:abc"])
def test_unpinned_images_are_refused(ref):
    with pytest.raises(config_mod.ConfigError, match="cuda_image"):
        config_mod.from_dict({**yaml.safe_load(PROFILE.read_text()), "cluster": {"cuda_image": ref}})


def test_gpu_limit_zero_keeps_every_task_on_the_cpu_pool(tmp_path):
    tree = yaml.safe_load(PROFILE.read_text())
    tree["cluster"]["gpu_limit"] = 0
    profile = tmp_path / "profile.yaml"
    profile.write_text(yaml.safe_dump(tree))
    spec, platform = _docs(pipeline_mod.compile_pipeline(profile, tmp_path / "p.yaml"))
    assert "nvidia.com/gpu" not in json.dumps(spec["deploymentSpec"]) + json.dumps(platform)


def test_relative_cache_dir_is_refused_for_the_cluster(tmp_path):
    tree = yaml.safe_load(PROFILE.read_text())
    tree["model"]["cache_dir"] = "~/.cache/medtune/models"
    with pytest.raises(ValueError, match="absolute path"):
        pipeline_mod.build(config_mod.from_dict(tree))


def test_local_runner_runs_tasks_placed_for_the_cluster(tmp_path):
    """kfp.local must accept every setting `place` adds: it ignores the Kubernetes ones (GPU, selectors,
    tolerations, PVCs, Secrets, timeouts, images) and honours retries. Two trivial components, named like
    the steps they stand in for (`place` goes by component name), run in seconds; `train` fails once and
    succeeds on its retry."""
    from kfp import compiler, components, dsl, local

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def train(marker: str) -> str:
        from pathlib import Path

        path = Path(marker)
        if not path.exists():
            path.write_text("failed once")
            raise RuntimeError("transient failure")
        return "ok"

    @dsl.component(base_image="python:3.11", install_kfp_package=False)
    def push(text: str) -> str:
        return text + "!"

    cfg = config_mod.load(PROFILE)
    retry = config_mod.RetryPolicy(retries=1, backoff_s=0)
    cfg = cfg.model_copy(update={"cluster": cfg.cluster.model_copy(update={"retries": {"train": retry}})})

    @dsl.pipeline(name="placed")
    def placed(marker: str) -> str:
        first = train(marker=marker)
        second = push(text=first.output)
        pipeline_mod.place([first, second], cfg)
        return second.output

    package = tmp_path / "placed.yaml"
    compiler.Compiler().compile(placed, str(package))
    text = package.read_text()
    assert "secretAsEnv" in text and "pvcMount" in text and "nvidia.com/gpu" in text
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))
    task = components.load_component_from_file(str(package))(marker=str(tmp_path / "marker"))
    assert task.output == "ok!"
    assert (tmp_path / "marker").read_text() == "failed once"
