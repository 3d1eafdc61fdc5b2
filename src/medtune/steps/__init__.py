"""The pipeline's steps: one module per step, `medtune/steps/<name>.py`, holding all there is to know about it.

A step module declares
- `SPEC`: its StepSpec (task name, display name, what it needs on a cluster, default retries and timeout,
  which of its outputs the audit record reads);
- `run(config_json, run_id, ...)`: paths in, library call, paths out, MLflow logging; tests and the `medtune`
  commands call it directly;
- `component`: its thin typed `@dsl.component` (named after the step), which the DAG in `medtune.pipeline` calls.

Everything else about a step is derived from the specs: the task names the config accepts, display names,
which tasks get which Secret, PVC and node pool, retry and timeout defaults (`place` in medtune.pipeline),
the audit step's inputs and the documents `lineage` reads (medtune.steps.audit), and the README's
"What runs where" table (`table`, checked by a test).

Adding a step: write the library function and its tests, add `medtune/steps/<name>.py` with SPEC, run and
component, list the module in STEP_MODULES, and call its component in `medtune.pipeline`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cache
from typing import Literal

from medtune import quiet
from medtune.config import RetryPolicy

quiet.library_noise_off()  # steps run in their own processes: this is where their output starts

# The step modules in DAG order (the order of the README's table).
STEP_MODULES = ("open_run", "validate_data", "preprocess", "trials", "train", "select", "finish", "preference",
                "evaluate", "gate", "register", "push", "deploy", "audit")


@dataclass(frozen=True)
class StepSpec:
    """What a step needs where it runs; a cluster profile can override only retries and timeouts per task."""

    name: str  # the task (and component) name; the module is medtune/steps/<name>.py
    display_name: str  # what the KFP UI shows
    gpu: bool = False  # GPU pool: CUDA image, GPU request, the pool's selector and toleration
    # The Hugging Face token as a file ($HF_TOKEN_PATH): "write" (cluster.hf_secret) only where the Hub is
    # written to, "read" (cluster.hf_read_secret, optional) where it is downloaded from, "" none.
    hub_token: Literal["", "read", "write"] = ""
    model_cache: bool = False  # the model-cache PVC at model.cache_dir (and the Hub's download cache)
    data_pvc: bool = False  # the data PVC at cluster.data_mount (data.path lives there)
    mlflow: bool = True  # the MLflow credentials Secret (every step logs to the run)
    deployer_token: bool = False  # the KServe deployer's token Secret (medtune.kserve.rbac), not the runner's rights
    retry: RetryPolicy | None = None  # default retry policy; None: a failure fails the run
    timeout_s: int = 1800  # default wall-clock limit of the pod
    branch: str = ""  # "passed": runs only when the gate passed; "both": once in each branch of the gate
    # Documents the audit record reads, role -> output name of this step (see medtune.lineage.build).
    records: dict[str, str] = field(default_factory=dict)

    def key(self, output: str) -> str:
        """How the audit step names one of this step's outputs: "<task>/<output>"."""
        return f"{self.name}/{output}"


@cache
def modules() -> tuple:
    return tuple(importlib.import_module(f"medtune.steps.{name}") for name in STEP_MODULES)


def specs() -> dict[str, StepSpec]:
    """Every step's spec by task name, in DAG order."""
    found = {m.SPEC.name: m.SPEC for m in modules()}
    assert tuple(found) == STEP_MODULES, "a step's SPEC.name must be its module's name"
    return found


def task_name(task) -> str:
    """The step a DAG task runs (KFP names a component after its function, with dashes)."""
    return task.component_spec.name.replace("-", "_")


def table(specs_: dict[str, StepSpec] | None = None) -> str:
    """The README's "What runs where" table (markdown), generated from the specs; a test compares them."""
    from medtune import config as config_mod

    cluster = config_mod.ClusterConfig()

    def res(r: config_mod.Resources, gpu: bool) -> str:
        return (f"1 GPU, {r.cpu} CPU, " if gpu else f"{r.cpu} CPU, ") + r.memory.replace("Gi", " Gi")

    def duration(seconds: int) -> str:
        return f"{seconds // 3600} h" if seconds % 3600 == 0 else f"{seconds // 60} min"

    rows = ["| step | image | pool | resources | PVC | Secrets | retries | timeout |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in (specs_ or specs()).values():
        step = {"": s.name, "passed": f"{s.name} (if gate passed)", "both": f"{s.name} (both branches)"}[s.branch]
        pvc = ", ".join(p for p, on in (("model cache", s.model_cache), (f"data at {cluster.data_mount}",
                                                                          s.data_pvc)) if on)
        hub = {"read": "hf-read (file)", "write": "hf (file)"}.get(s.hub_token, "")
        secrets = ", ".join(n for n, on in (("mlflow", s.mlflow), (hub, s.hub_token),
                                            ("deployer token", s.deployer_token)) if on)
        cells = [step, "cuda" if s.gpu else "cpu", "GPU" if s.gpu else "CPU",
                 res(cluster.gpu_resources if s.gpu else cluster.cpu_resources, s.gpu), pvc, secrets,
                 str(s.retry.retries) if s.retry else "", duration(s.timeout_s)]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def kfp_component(spec: StepSpec):
    """The `@dsl.component` decorator for a step: its default image follows the spec's pool (`place` pins the
    profile's images per task); medtune comes from the image, so KFP installs nothing."""
    import os

    from kfp import dsl

    from medtune.images import CPU_IMAGE, GPU_IMAGE

    if os.environ.get("_KFP_RUNTIME") == "true":
        # Inside a task the component's body imports this module for `run`; KFP's runtime kfp.dsl has no
        # decorators, and the function needs none there.
        return lambda func: func
    return dsl.component(base_image=GPU_IMAGE if spec.gpu else CPU_IMAGE, install_kfp_package=False)
