"""The medtune DAG: validate -> preprocess -> train -> evaluate -> gate -> (register, push).

The function reads as the picture in the README; cluster placement (GPU pool for training) is applied
by `compile_pipeline` so the same DAG runs unchanged with kfp.local.
"""

from pathlib import Path
from typing import NamedTuple

from kfp import compiler, dsl, kubernetes
from kfp.dsl import HTML, Artifact, Model

from components import evaluate, gate, open_run, preprocess, push, register, train, validate_data
from medtune import config as config_mod

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_PROFILE = ROOT / "configs" / "qwen2.5-0.5b-qlora.yaml"
COMPILED = Path(__file__).resolve().parent / "medtune.yaml"


class Outputs(NamedTuple):
    run_id: str
    passed: bool
    decision: Artifact
    report: HTML
    adapter: Model
    comparison: Artifact


def build(default_config: config_mod.Config):
    cluster = default_config.cluster

    @dsl.pipeline(name="medtune", description="Gated LoRA/QLoRA fine-tuning for medical question answering.")
    def medtune(config: str = default_config.to_json()) -> Outputs:
        run = open_run(config=config, pipeline_run=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
        run_id = run.output
        data = validate_data(config=config, run_id=run_id)
        splits = preprocess(config=config, run_id=run_id, data=data.outputs["data"])
        trained = train(config=config, run_id=run_id, train_split=splits.outputs["train_split"],
                        validation_split=splits.outputs["validation_split"])
        scored = evaluate(config=config, run_id=run_id, test_split=splits.outputs["test_split"],
                          adapter=trained.outputs["adapter"])
        verdict = gate(config=config, run_id=run_id, comparison=scored.outputs["comparison"],
                       history=trained.outputs["history"], predictions=scored.outputs["predictions"])
        with dsl.If(verdict.outputs["passed"] == True):  # noqa: E712 (KFP builds a condition from ==)
            register(config=config, run_id=run_id, adapter=trained.outputs["adapter"],
                     decision=verdict.outputs["decision"])
            push(config=config, run_id=run_id, adapter=trained.outputs["adapter"],
                 decision=verdict.outputs["decision"])

        for task in (trained, scored):
            on_gpu_pool(task, cluster)
        return Outputs(run_id=run_id, passed=verdict.outputs["passed"], decision=verdict.outputs["decision"],
                       report=verdict.outputs["report"], adapter=trained.outputs["adapter"],
                       comparison=scored.outputs["comparison"])

    return medtune


def on_gpu_pool(task, cluster: config_mod.ClusterConfig) -> None:
    """Ask for GPUs and tolerate the GPU pool's taint; kfp.local ignores these Kubernetes settings."""
    if cluster.gpu_limit == 0:
        return
    task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(cluster.gpu_limit)
    for key, value in cluster.gpu_node_selector.items():
        kubernetes.add_node_selector(task, label_key=key, label_value=value)
    kubernetes.add_toleration(task, key=cluster.gpu_toleration_key, operator="Exists", effect="NoSchedule")


def compile_pipeline(profile: Path = CLUSTER_PROFILE, output: Path = COMPILED) -> Path:
    compiler.Compiler().compile(build(config_mod.load(profile)), package_path=str(output))
    return output
