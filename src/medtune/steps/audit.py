"""Step `audit` (both branches of the gate): the run's audit record, lineage.json.

Its inputs are derived, not written down: `component(tasks)` builds the audit component with one input per
artifact output of each task it is given (named `<task>__<output>`; KFP Metrics outputs are left out, their
values are in comparison and history), optional for steps that run only when the gate passed. The
documents `lineage.build` reads come from each spec's `records` (role -> output).
"""

import hashlib
import json
import linecache
from pathlib import Path

from medtune import config as config_mod
from medtune.config import RetryPolicy
from medtune.steps import StepSpec, kfp_component, task_name

# audit reads the model cache to identify the base model (the snapshot commit or the directory's content).
SPEC = StepSpec(name="audit", display_name="Write audit record (lineage.json)", model_cache=True,
                retry=RetryPolicy(retries=2), branch="both")
SEPARATOR = "__"  # <task>__<output>: the audit component's input names (task names have single underscores)
UNAUDITED = "system.Metrics"  # KFP metrics outputs: values already in comparison/history


def _audited(task) -> dict[str, str]:
    """The task's artifact outputs the record hashes: output name -> artifact class name (Dataset, Model...)."""
    from kfp.dsl import types

    return {name: out.type.split("@")[0].removeprefix("system.")
            for name, out in task.component_spec.outputs.items()
            if not types.type_utils.is_parameter_type(out.type) and not out.type.startswith(UNAUDITED)}


def evidence(tasks: list) -> dict:
    """The audit component's arguments for these tasks: each artifact output, by input name."""
    return {f"{task_name(t)}{SEPARATOR}{name}": t.outputs[name] for t in tasks for name in _audited(t)}


def component(tasks: list, specs: dict[str, StepSpec] | None = None):
    """The audit component for a DAG made of `tasks` (from every branch; inputs of tasks that run only when
    the gate passed are optional, since the other branch's audit has no such task)."""
    from medtune import steps

    specs = specs or steps.specs()
    required, optional, docs = [], [], []
    for task in tasks:
        name = task_name(task)
        passed_only = specs[name].branch == "passed"
        for output, kind in _audited(task).items():
            arg = f"{name}{SEPARATOR}{output}"
            (optional if passed_only else required).append(f"{arg}: Input[{kind}]" + (" = None" if passed_only else ""))
            docs.append(f"        {arg}: Output `{output}` of {name}" + (" (if gate passed)." if passed_only else "."))
    source = "\n".join([
        f"def audit(config: str, run_id: str, lineage: Output[Artifact], {', '.join(required + optional)}):",
        '    """Write the run\'s audit record (lineage.json): every artifact of the run by sha256, linked to the',
        "    data, code, config, images, base model, metrics, gate decision, registry version and Hub commit.",
        "",
        "    Args:",
        "        config: The resolved run-time config (JSON).",
        "        run_id: The MLflow parent run id.",
        "        lineage: The audit record.",
        *docs,
        '    """',
        "    produced = dict(locals())",
        "    from medtune.steps import audit as step",
        "",
        "    step.from_inputs(config, run_id, produced, lineage)",
        ""])
    # KFP ships a component's source (inspect.getsource): keep this generated one where inspect finds it.
    filename = f"<medtune audit component {hashlib.sha256(source.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    from kfp.dsl import HTML, Artifact, Dataset, Input, Model, Output  # noqa: F401 (the annotations' names)

    namespace = {"Input": Input, "Output": Output, "Artifact": Artifact, "Dataset": Dataset, "Model": Model,
                 "HTML": HTML}
    exec(compile(source, filename, "exec"), namespace)
    return kfp_component(SPEC)(namespace["audit"])


def from_inputs(config_json: str, run_id: str, inputs: dict, lineage_output) -> dict:
    """The component's body: artifacts keyed "<task>/<output>" as (uri, local path), then `run`."""
    artifacts = {key.replace(SEPARATOR, "/", 1): (a.uri, a.path) for key, a in inputs.items()
                 if SEPARATOR in key and a is not None}
    record = run(config_json, run_id, artifacts, lineage_output.path)
    lineage_output.metadata.update(schema=record["schema"], gate_passed=record["gate"]["passed"],
                                   model_version=record["mlflow"]["model_version"] or "none")
    return record


def documents(artifacts: dict, specs: dict[str, StepSpec] | None = None) -> dict[str, dict]:
    """The JSON documents the record is built from, by the role each spec's `records` gives them."""
    from medtune import steps

    found = {}
    for spec in (specs or steps.specs()).values():
        for role, output in spec.records.items():
            if spec.key(output) in artifacts:
                found[role] = json.loads(Path(artifacts[spec.key(output)][1]).read_text())
    return found


def run(config_json: str, run_id: str, artifacts: dict[str, tuple[str, str]], lineage_path: str) -> dict:
    """Write the run's audit record from every artifact the DAG produced (keyed "task/output": (uri, path));
    log it on the MLflow run and tag its hash on the run and on the registered version."""
    import mlflow

    from medtune import lineage, tags, tracking

    cfg = config_mod.from_json(config_json)
    with tracking.step(cfg, run_id, SPEC.name):
        client = mlflow.MlflowClient()
        run_tags = client.get_run(run_id).data.tags
        run = {"mlflow_run_id": run_id, "pipeline_run": run_tags.get(tags.PIPELINE_RUN),
               "kfp_run_id": run_tags.get(tags.KFP_RUN_ID),
               # who asked for the run; the OS user of the step's process only when nobody said
               "started_by": run_tags.get(tags.REQUESTED_BY) or run_tags.get("mlflow.user"),
               "tracking_uri": mlflow.get_tracking_uri()}
        stored = {key: lineage.Stored(uri, Path(path)) for key, (uri, path) in artifacts.items()}
        record = lineage.build(cfg, run, stored, documents(artifacts), tracking.images_ran(run_id))
        text = lineage.write(record, Path(lineage_path)).read_text()
        digest = hashlib.sha256(text.encode()).hexdigest()
    client.log_text(run_id, text, f"lineage/{lineage.FILENAME}")  # the parent run: where people look
    # `model.revision` may be a branch that moves; these name the exact weights (Hub commit or content hash).
    base = record["base_model"]
    found = {tags.LINEAGE_SHA256: digest, tags.BASE_MODEL_COMMIT: base["commit"],
             tags.BASE_MODEL_SHA256: base["sha256"]}
    found = {k: v for k, v in found.items() if v}
    for key, value in found.items():
        client.set_tag(run_id, key, value)
    if record["mlflow"]["model_version"]:
        name, version = record["mlflow"]["model_version"].split("/")
        for key, value in found.items():
            client.set_model_version_tag(name, version, key, value)
    return record
