"""The medtune DAG: validate -> preprocess -> train (one task per sweep trial) -> select -> finish -> preference ->
evaluate -> gate -> register -> push -> deploy -> audit.

Training always fans out over the sweep's trials (`dsl.ParallelFor`, at most `sweep.parallelism` at once); a
config without a sweep has one trial, so the plain pipeline is a sweep of size 1. `select` collects every
trial (`dsl.Collected`) and only the winner goes on: to `finish`, which trains the rest of its steps when the
sweep screened its trials on part of them (`sweep.screen_fraction`, successive halving), then to `preference`:
DPO after SFT when the run's config enables it. Each is a pass-through otherwise, so the DAG has one shape
whatever the run asks.

The gate decides the branch: a passing run is registered, pushed, deployed (KServe), then audited; a failing
one is audited only. Either way the run ends with its audit record (lineage.json).

The pipeline function reads as the picture in the README; `place` then applies each task's step spec
(medtune/steps/<task>.py: display name, pool, Secrets, PVCs, default retries and timeout) and the profile's
`cluster:` section (images, pools, resources, PVC and Secret names, per-task overrides) to it. kfp.local ignores the Kubernetes settings and honours only the retry policies, so the same
compiled YAML runs unchanged with `medtune run`.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Artifact, Model

from medtune import config as config_mod
from medtune import images, pins, steps
from medtune.steps import (audit, deploy, evaluate, finish, gate, open_run, preference, preprocess,  # noqa: F401
                           push, register, select, train, trials, validate_data)

ROOT = Path(__file__).resolve().parents[2]  # the checkout: profiles under configs/, the IR under pipelines/
CLUSTER_PROFILE = ROOT / "configs" / "qwen2.5-0.5b-qlora.yaml"
COMPILED = ROOT / "pipelines" / "medtune.yaml"
# The images' user is medtune (HOME=/home/medtune, see images/): Hub downloads land in this folder,
# which is the PVC's `huggingface/` sub-folder on model tasks.
HF_CACHE = "/home/medtune/.cache/huggingface"
HF_TOKEN_KEY = "token"
# The Hub tokens are files named by $HF_TOKEN_PATH (huggingface_hub reads it), never env vars that every
# process of the pod inherits; which token a step gets is its spec's `hub_token`.
HF_TOKEN_DIR = "/var/run/secrets/medtune/hf"
MLFLOW_CLIENT_LABEL = ("medtune.io/mlflow-client", "true")  # manifests/mlflow/networkpolicy.yaml admits it
MLFLOW_SECRET_KEYS = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}


class Outputs(NamedTuple):
    run_id: str
    passed: bool
    decision: Artifact
    report: HTML
    adapter: Model
    comparison: Artifact


def build(profile: config_mod.Profile):
    @dsl.pipeline(name="medtune", description="Gated LoRA/QLoRA fine-tuning for medical question answering.")
    def medtune(config: str = profile.to_json(), requested_by: str = "") -> Outputs:
        run = open_run.component(config=config, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                                 kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, requested_by=requested_by)
        run_id = run.output
        data = validate_data.component(config=config, run_id=run_id)
        splits = preprocess.component(config=config, run_id=run_id, data=data.outputs["data"])
        planned = trials.component(config=config, run_id=run_id)
        # parallelism is compiled in: it bounds the GPUs the sweep holds on the cluster
        with dsl.ParallelFor(planned.output, parallelism=profile.sweep.parallelism) as trial:
            trained = train.component(config=config, trial=trial,  # the trial carries the run id
                                      train_split=splits.outputs["train_split"],
                                      validation_split=splits.outputs["validation_split"])
        best = select.component(config=config, run_id=run_id, outcomes=dsl.Collected(trained.outputs["outcome"]),
                                adapters=dsl.Collected(trained.outputs["adapter"]),
                                histories=dsl.Collected(trained.outputs["history"]),
                                checkpoints=dsl.Collected(trained.outputs["checkpoint"]))
        finished = finish.component(config=config, run_id=run_id, sft_adapter=best.outputs["adapter"],
                                    sft_history=best.outputs["history"], checkpoint=best.outputs["checkpoint"],
                                    trials_in=best.outputs["trials"], train_split=splits.outputs["train_split"],
                                    validation_split=splits.outputs["validation_split"])
        preferred = preference.component(config=config, run_id=run_id, sft_adapter=finished.outputs["adapter"],
                                         sft_history=finished.outputs["history"],
                                         train_split=splits.outputs["train_split"],
                                         validation_split=splits.outputs["validation_split"],
                                         test_split=splits.outputs["test_split"])
        adapter = preferred.outputs["adapter"]  # what is evaluated, gated, registered, pushed and served
        scored = evaluate.component(config=config, run_id=run_id, test_split=splits.outputs["test_split"],
                                    validation_split=splits.outputs["validation_split"], adapter=adapter,
                                    sft_adapter=finished.outputs["adapter"])
        verdict = gate.component(config=config, run_id=run_id, comparison=scored.outputs["comparison"],
                                 history=preferred.outputs["history"], predictions=scored.outputs["predictions"],
                                 trials=finished.outputs["trials"],
                                 policy_sha256=profile.policy_digest())  # a constant: run parameters cannot move it
        done = [data, splits, best, finished, preferred, scored, verdict]  # the audit hashes all they wrote
        with dsl.If(verdict.outputs["Output"] == True):  # noqa: E712 (KFP builds a condition from ==)
            registered = register.component(config=config, run_id=run_id, adapter=adapter,
                                            decision=verdict.outputs["decision"])
            pushed = push.component(config=config, run_id=run_id, adapter=adapter,
                                    decision=verdict.outputs["decision"], comparison=scored.outputs["comparison"],
                                    splits=splits.outputs["summary"], validation=data.outputs["validation"],
                                    registration=registered.outputs["registration"])
            deployed = deploy.component(config=config, run_id=run_id, registration=registered.outputs["registration"])
            deployed.after(pushed)  # served once registry and Hub both hold it
            audited = audit.component([*done, registered, pushed, deployed])
            promoted = audited(config=config, run_id=run_id,
                               **audit.evidence([*done, registered, pushed, deployed]))
        with dsl.Else():
            rejected = audited(config=config, run_id=run_id, **audit.evidence(done))

        place([run, planned, trained, *done, registered, pushed, deployed, promoted, rejected], profile)
        return Outputs(run_id=run_id, passed=verdict.outputs["Output"], decision=verdict.outputs["decision"],
                       report=verdict.outputs["report"], adapter=adapter,
                       comparison=scored.outputs["comparison"])

    return medtune


def place(tasks: list, profile: config_mod.Profile, specs: dict[str, steps.StepSpec] | None = None) -> None:
    """Apply each task's step spec (by its component's name) and the profile's `cluster:` section to it."""
    cluster = profile.cluster
    specs = specs or steps.specs()
    for task in tasks:
        spec = specs[steps.task_name(task)]
        task.set_display_name(spec.display_name)
        # Never cached: KFP keys the cache on inputs, and `data.path` names files whose content it cannot see
        # (a changed dataset would reuse the old validation), and a cached step would log nothing to this
        # run's MLflow run, leaving a hole in its audit trail.
        task.set_caching_options(False)
        policy = cluster.retry_policy(spec)
        if policy and policy.retries:
            task.set_retry(num_retries=policy.retries, backoff_duration=f"{policy.backoff_s}s",
                           backoff_factor=policy.backoff_factor, backoff_max_duration=f"{policy.backoff_max_s}s")
        kubernetes.set_timeout(task, cluster.timeout(spec))
        image = on_gpu_pool(task, cluster) if spec.gpu and cluster.gpu_limit > 0 else on_cpu_pool(task, cluster)
        task.set_env_variable(images.ENV, image)  # the step records the image its pod runs (not a secret)
        # Where the Secrets go is fixed here, at compile time, not by the run's config parameter (medtune.pins).
        pod_env(task, pins.ENV, pins.of(profile))
        if spec.mlflow:
            kubernetes.add_pod_label(task, *MLFLOW_CLIENT_LABEL)
        if spec.mlflow and cluster.mlflow_secret:
            kubernetes.use_secret_as_env(task, secret_name=cluster.mlflow_secret,
                                         secret_key_to_env=MLFLOW_SECRET_KEYS, optional=True)
        hub_secret = {"write": cluster.hf_secret, "read": cluster.hf_read_secret}.get(spec.hub_token)
        if hub_secret:
            kubernetes.use_secret_as_volume(task, secret_name=hub_secret, mount_path=HF_TOKEN_DIR, optional=True)
            pod_env(task, "HF_TOKEN_PATH", f"{HF_TOKEN_DIR}/{HF_TOKEN_KEY}")
        if spec.deployer_token:
            kubernetes.use_secret_as_env(task, secret_name=f"{profile.deploy.service_account}-token",
                                         secret_key_to_env={"token": "K8S_TOKEN"}, optional=True)
        if spec.model_cache:
            mount_model_cache(task, cluster.model_cache_pvc, profile.model.cache_dir)
        if spec.data_pvc and cluster.data_pvc:
            kubernetes.mount_pvc(task, pvc_name=cluster.data_pvc, mount_path=cluster.data_mount)


def pod_env(task, name: str, value: str) -> None:
    """A constant environment variable in the task's pod only: an annotation of the pod, read back through
    the downward API. kfp.local applies a task's plain env too, and there a token path or the cluster's
    pins would override the user's own setup (`hf auth login`, the local MLflow server)."""
    annotation = f"medtune.io/{name.lower().removeprefix('medtune_').replace('_', '-')}"
    kubernetes.add_pod_annotation(task, annotation, value)
    kubernetes.use_field_path_as_env(task, name, f"metadata.annotations['{annotation}']")


def on_gpu_pool(task, cluster: config_mod.ClusterConfig) -> str:
    """The CUDA image, GPUs, CPU/memory, the GPU pool's node selector and a toleration for its taint."""
    task.set_container_image(cluster.cuda_image)
    task.set_accelerator_type(cluster.gpu_resource).set_accelerator_limit(cluster.gpu_limit)
    set_resources(task, cluster.gpu_resources)
    for key, value in cluster.gpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(task, key=cluster.gpu_toleration_key, operator="Exists", effect="NoSchedule")
    return cluster.cuda_image


def on_cpu_pool(task, cluster: config_mod.ClusterConfig) -> str:
    """The CPU image and no toleration: a GPU pool tainted NoSchedule keeps these pods off its nodes."""
    task.set_container_image(cluster.cpu_image)
    set_resources(task, cluster.cpu_resources)
    for key, value in cluster.cpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    return cluster.cpu_image


def set_resources(task, resources: config_mod.Resources) -> None:
    task.set_cpu_request(resources.cpu).set_cpu_limit(resources.cpu)
    task.set_memory_request(resources.memory).set_memory_limit(resources.memory)


def mount_model_cache(task, pvc: str, cache_dir: str) -> None:
    """One PVC holds medtune's model cache (model.cache_dir) and the Hub's download cache."""
    if not cache_dir.startswith("/"):
        raise ValueError(f"model.cache_dir={cache_dir}: the cluster profile needs an absolute path (the PVC mount)")
    kubernetes.mount_pvc(task, pvc_name=pvc, mount_path=cache_dir)
    kubernetes.mount_pvc(task, pvc_name=pvc, mount_path=HF_CACHE, sub_path="huggingface")


def compile_pipeline(profile: Path = CLUSTER_PROFILE, output: Path = COMPILED) -> Path:
    compiler.Compiler().compile(build(config_mod.load(profile)), package_path=str(output))
    return output
