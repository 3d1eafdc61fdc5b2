"""The medtune DAG: validate -> preprocess -> train -> evaluate -> gate -> register -> push -> audit.

The gate decides the branch: a passing run is registered, pushed, then audited; a failing one is audited
only. Either way the run ends with its audit record (lineage.json).

The pipeline function reads as the picture in the README; `place` then applies the profile's `cluster:`
section (images, GPU pool, resources, model-cache PVC, Secrets, retries, timeouts, caching, display names)
to each task. kfp.local ignores the Kubernetes settings and honours only the retry policies, so the same
compiled YAML runs unchanged with `medtune run`.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Artifact, Model

from medtune import config as config_mod
from medtune.components import audit, evaluate, gate, open_run, preprocess, push, register, train, validate_data

ROOT = Path(__file__).resolve().parents[2]  # the checkout: profiles under configs/, the IR under pipelines/
CLUSTER_PROFILE = ROOT / "configs" / "qwen2.5-0.5b-qlora.yaml"
COMPILED = ROOT / "pipelines" / "medtune.yaml"

DISPLAY_NAMES = {
    "open_run": "Open MLflow run",
    "validate_data": "Validate data",
    "preprocess": "Preprocess and split",
    "train": "Train LoRA/QLoRA adapter",
    "evaluate": "Evaluate candidate vs base vs champion",
    "gate": "Promotion gate",
    "register": "Register model version",
    "push": "Push adapter to the Hub",
    "audit": "Write audit record (lineage.json)",
}
# Tasks that log to MLflow (all of them) get its credentials; tasks that talk to the Hugging Face Hub
# (dataset or model downloads, the push) get the token; tasks that load the base model mount the cache
# (audit reads it to identify the base model: the snapshot commit or the directory's content).
HUB_TASKS = ("validate_data", "preprocess", "train", "evaluate", "push")
MODEL_TASKS = ("preprocess", "train", "evaluate", "audit")
# The images' user is medtune (HOME=/home/medtune, see images/): Hub downloads land in this folder,
# which is the PVC's `huggingface/` sub-folder on model tasks.
HF_CACHE = "/home/medtune/.cache/huggingface"
HF_TOKEN_KEY = "token"
MLFLOW_SECRET_KEYS = {"username": "MLFLOW_TRACKING_USERNAME", "password": "MLFLOW_TRACKING_PASSWORD"}


class Outputs(NamedTuple):
    run_id: str
    passed: bool
    decision: Artifact
    report: HTML
    adapter: Model
    comparison: Artifact


def build(default_config: config_mod.Config):
    @dsl.pipeline(name="medtune", description="Gated LoRA/QLoRA fine-tuning for medical question answering.")
    def medtune(config: str = default_config.to_json(), requested_by: str = "") -> Outputs:
        run = open_run(config=config, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER,
                       kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER, requested_by=requested_by)
        run_id = run.output
        data = validate_data(config=config, run_id=run_id)
        splits = preprocess(config=config, run_id=run_id, data=data.outputs["data"])
        trained = train(config=config, run_id=run_id, train_split=splits.outputs["train_split"],
                        validation_split=splits.outputs["validation_split"])
        scored = evaluate(config=config, run_id=run_id, test_split=splits.outputs["test_split"],
                          validation_split=splits.outputs["validation_split"], adapter=trained.outputs["adapter"])
        verdict = gate(config=config, run_id=run_id, comparison=scored.outputs["comparison"],
                       history=trained.outputs["history"], predictions=scored.outputs["predictions"])
        # Everything the run produced, for the audit record; register and push add theirs in the passing branch.
        evidence = dict(config=config, run_id=run_id, data=data.outputs["data"],
                        quarantine=data.outputs["quarantine"], validation=data.outputs["validation"],
                        data_docs=data.outputs["data_docs"], train_split=splits.outputs["train_split"],
                        validation_split=splits.outputs["validation_split"], test_split=splits.outputs["test_split"],
                        splits=splits.outputs["summary"], adapter=trained.outputs["adapter"],
                        history=trained.outputs["history"], comparison=scored.outputs["comparison"],
                        predictions=scored.outputs["predictions"], decision=verdict.outputs["decision"],
                        report=verdict.outputs["report"])
        with dsl.If(verdict.outputs["Output"] == True):  # noqa: E712 (KFP builds a condition from ==)
            registered = register(config=config, run_id=run_id, adapter=trained.outputs["adapter"],
                                  decision=verdict.outputs["decision"])
            pushed = push(config=config, run_id=run_id, adapter=trained.outputs["adapter"],
                          decision=verdict.outputs["decision"], comparison=scored.outputs["comparison"],
                          splits=splits.outputs["summary"], validation=data.outputs["validation"],
                          registration=registered.outputs["registration"])
            promoted = audit(**evidence, registration=registered.outputs["registration"],
                             hub_push=pushed.outputs["hub_push"])
        with dsl.Else():
            rejected = audit(**evidence)

        place([run, data, splits, trained, scored, verdict, registered, pushed, promoted, rejected], default_config)
        return Outputs(run_id=run_id, passed=verdict.outputs["Output"], decision=verdict.outputs["decision"],
                       report=verdict.outputs["report"], adapter=trained.outputs["adapter"],
                       comparison=scored.outputs["comparison"])

    return medtune


def place(tasks: list, cfg: config_mod.Config) -> None:
    """Apply the cluster settings of `cfg` to each task of the DAG (by its component's name)."""
    cluster = cfg.cluster
    for task in tasks:
        name = task.component_spec.name.replace("-", "_")
        task.set_display_name(DISPLAY_NAMES[name])
        # Never cached: KFP keys the cache on inputs, and `data.path` names files whose content it cannot see
        # (a changed dataset would reuse the old validation), and a cached step would log nothing to this
        # run's MLflow run, leaving a hole in its audit trail.
        task.set_caching_options(False)
        if name in cluster.retries:
            policy = cluster.retries[name]
            task.set_retry(num_retries=policy.retries, backoff_duration=f"{policy.backoff_s}s",
                           backoff_factor=policy.backoff_factor, backoff_max_duration=f"{policy.backoff_max_s}s")
        if name in cluster.timeouts_s:
            kubernetes.set_timeout(task, cluster.timeouts_s[name])
        if name in cluster.gpu_tasks and cluster.gpu_limit > 0:
            on_gpu_pool(task, cluster)
        else:
            on_cpu_pool(task, cluster)
        if cluster.mlflow_secret:
            kubernetes.use_secret_as_env(task, secret_name=cluster.mlflow_secret,
                                         secret_key_to_env=MLFLOW_SECRET_KEYS, optional=True)
        if cluster.hf_secret and name in HUB_TASKS:
            kubernetes.use_secret_as_env(task, secret_name=cluster.hf_secret,
                                         secret_key_to_env={HF_TOKEN_KEY: cfg.hub.token_env}, optional=True)
        if name in MODEL_TASKS:
            mount_model_cache(task, cluster.model_cache_pvc, cfg.model.cache_dir)
        if name == "validate_data" and cluster.data_pvc:
            kubernetes.mount_pvc(task, pvc_name=cluster.data_pvc, mount_path=cluster.data_mount)


def on_gpu_pool(task, cluster: config_mod.ClusterConfig) -> None:
    """The CUDA image, GPUs, CPU/memory, the GPU pool's node selector and a toleration for its taint."""
    task.set_container_image(cluster.cuda_image)
    task.set_accelerator_type(cluster.gpu_resource).set_accelerator_limit(cluster.gpu_limit)
    set_resources(task, cluster.gpu_resources)
    for key, value in cluster.gpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(task, key=cluster.gpu_toleration_key, operator="Exists", effect="NoSchedule")


def on_cpu_pool(task, cluster: config_mod.ClusterConfig) -> None:
    """The CPU image and no toleration: a GPU pool tainted NoSchedule keeps these pods off its nodes."""
    task.set_container_image(cluster.cpu_image)
    set_resources(task, cluster.cpu_resources)
    for key, value in cluster.cpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)


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
