"""Run the compiled pipeline on this machine with kfp.local, next to a local MLflow server."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from pathlib import Path

import mlflow

from medtune import digests, lineage, models, runs, runview, tracking, uris
from medtune.config import Config
from medtune.local_server import ServerError

MLFLOW_DIR = Path(".medtune/mlflow")
# What SIGTERM must still undo (leave the MLflow server, close the run view) before the process ends. It ends
# with os._exit: unwinding would wait on kfp.local's worker threads, and they retry the stopped task (its
# step's retry policy), so `medtune run` would train on instead of stopping.
_ON_TERMINATE: list[Callable[[], object]] = []


@contextmanager
def _undone_on_sigterm(cleanup: Callable[[], object]) -> Iterator[None]:
    _ON_TERMINATE.append(cleanup)
    try:
        yield
    finally:
        _ON_TERMINATE.remove(cleanup)


class PipelineFailed(RuntimeError):
    pass


def compiled_pipeline_path() -> Path:
    from medtune.pipeline import COMPILED

    return COMPILED


def run(cfg: Config, output_dir: Path, run_name: str, console, verbose: bool = False, runner=None) -> dict:
    """Run the compiled DAG; the console shows one line per step (all of it with `verbose`), and each
    step's full output goes to `output_dir/logs/<step>.log`. `runner`: kfp.local's runner, SubprocessRunner
    in this virtualenv unless given (scripts/test-images passes a DockerRunner: every task in its image)."""
    signal.signal(signal.SIGTERM, _terminate)
    output_dir = output_dir.resolve()  # artifact URIs in the audit record are these paths
    output_dir.mkdir(parents=True, exist_ok=True)
    external = _external_server(cfg)
    if external and external.startswith("http") and not tracking.healthy(external):
        # MLflow's client retries for minutes before giving up; say what is wrong at once.
        raise PipelineFailed(f"the MLflow server at {external} (tracking.tracking_uri or $MLFLOW_TRACKING_URI) "
                             "is not reachable; unset both to let medtune start a local one")
    console.print(f"model: {cfg.model.id} -> {models.resolve(cfg.model)}")  # fetch/convert once, up front
    server = nullcontext(external) if external else tracking.local_server(MLFLOW_DIR)
    try:
        with server as uri, _undone_on_sigterm(lambda: server.__exit__(None, None, None)):
            return _run_with(cfg, uri, output_dir, console, verbose, runner)
    except ServerError as exc:
        raise PipelineFailed(f"the local MLflow server: {exc}") from None


def _external_server(cfg: Config) -> str | None:
    """The tracking server the user named; `medtune` moved any credentials in it to the environment first
    (uris.tracking_credentials_to_env), and the URI is redacted again in case of another caller."""
    return uris.redact(cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))


def _run_with(cfg: Config, uri: str, output_dir: Path, console, verbose: bool, runner) -> dict:
    from kfp import components, local

    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"tracking_uri": uri})})
    console.print(f"MLflow tracking server: {uri}")
    # The steps run in this virtualenv, not in their images, and cluster settings (GPUs, node pools,
    # resources) don't apply on one machine: kfp warns about both once per task.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task", category=RuntimeWarning)
    warnings.filterwarnings("ignore", message=r"Task '.*': settings \[", category=UserWarning)
    local.init(runner=runner or local.SubprocessRunner(use_venv=False), pipeline_root=str(output_dir / "artifacts"),
               workspace_root=str(output_dir / "workspace"))
    pipeline = components.load_component_from_file(str(compiled_pipeline_path()))
    view = runview.RunView(output_dir / "logs", runview.dag_tasks(compiled_pipeline_path()), console,
                           live=console.is_terminal, verbose=verbose)
    os.environ[lineage.STEP_LOGS] = str(view.log_dir)  # the tasks inherit it; the audit record lists the logs
    try:
        with view, redirect_stdout(view), redirect_stderr(view), \
                _undone_on_sigterm(lambda: view.__exit__(SystemExit, SystemExit(143), None)):
            task = pipeline(config=cfg.to_json(), requested_by=digests.requester())
    except RuntimeError as exc:
        step = view.failed()
        if step is None:
            raise PipelineFailed(f"the pipeline failed: {exc} (logs in {view.log_dir})") from None
        raise PipelineFailed(f"step {step.name} failed: {step.detail or 'see its log'}\n"
                             f"log: {view.log_path(step.name)}") from None
    summary = summarise(task.outputs, output_dir, uri)
    summary.update(profile=cfg.name, logs=str(view.log_dir), finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    (output_dir / "run.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _terminate(*_) -> None:
    """SIGTERM (Ctrl-C's batch cousin): stop the tasks kfp.local is running and wait for them (a train task
    finishes its step and saves a checkpoint), close the run view and leave the local MLflow server (stopping
    it if this run was its last client), then exit 143. Without this the tasks would run on, orphaned."""
    _stop_tasks()
    for cleanup in reversed(_ON_TERMINATE):
        try:
            cleanup()
        except Exception as exc:  # the others must still run; the exit code says what happened
            print(f"medtune: while stopping: {exc}", file=sys.__stderr__)
    for stream in (sys.__stdout__, sys.__stderr__):
        stream.flush()
    os._exit(143)


def _stop_tasks(grace_s: float = 180) -> None:
    """Terminate this run's task processes until none is left (a retry kfp.local starts meanwhile is stopped
    too); whatever still runs after `grace_s` is killed."""
    import psutil

    session = os.getsid(0)
    deadline = time.monotonic() + grace_s
    while True:
        tasks = []
        for child in psutil.Process().children(recursive=True):
            try:
                # The MLflow server runs in a session of its own and may serve other runs: that is _leave's call.
                if os.getsid(child.pid) == session:
                    tasks.append(child)
            except (ProcessLookupError, psutil.NoSuchProcess):
                continue
        if not tasks:
            return
        late = time.monotonic() > deadline
        for task in tasks:
            try:
                task.kill() if late else task.terminate()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(tasks, timeout=5)


def summarise(outputs: dict, output_dir: Path, tracking_uri: str) -> dict:
    decision = json.loads(Path(outputs["decision"].path).read_text())
    comparison = json.loads(Path(outputs["comparison"].path).read_text())
    run_id = outputs["run_id"]
    summary = {
        "run_id": run_id,
        "output_dir": str(output_dir),
        "report": outputs["report"].path,
        "adapter": outputs["adapter"].path,
        "decision": outputs["decision"].path,
        "mlflow_run": runs.run_url(uris.redact(tracking_uri),
                                   mlflow.MlflowClient(tracking_uri).get_run(run_id).info.experiment_id, run_id),
        "tracking_uri": uris.redact(tracking_uri),
        "gate": {"passed": decision["passed"], "summary": decision["summary"]},
        "metrics": {"base": comparison["base"], "candidate": comparison["candidate"]},
        "model_version": None,
        "hub": None,
        "deployment": None,
    }
    # register, push and deploy ran only if the gate passed; their outputs say what they did.
    tasks = Path(outputs["decision"].path).parents[1]  # this pipeline run's folder: <root>/<run>/<task>/...
    registration = next(tasks.glob("register/registration"), None)
    if registration:
        registered = json.loads(registration.read_text())
        summary["model_version"] = f"{registered['name']}/{registered['version']}"
        summary["registration"] = registered
    # every trial of the sweep and the winner (select and finish ran in every run: one trial without a sweep)
    summary["trials"] = json.loads((tasks / "finish" / "trials").read_text())
    # the preference stage (DPO after SFT, or a pass-through) and, when it ran, what it added
    from medtune.preference import closing_note

    stage = json.loads((tasks / "preference" / "summary").read_text())
    summary["preference"] = {**stage, "closing_note": closing_note(stage, decision, comparison)}
    for key, found in (("hub", "push/hub_push"), ("deployment", "deploy/deployment")):
        path = next(tasks.glob(found), None)
        if path:
            summary[key] = json.loads(path.read_text())
    # The audit step (`audit` or `audit-2`, one per gate branch) wrote the record; keep a copy at the top
    # of the output directory, where `medtune lineage` and `medtune verify` look for it.
    summary["lineage"] = str(shutil.copyfile(next(tasks.glob("audit*/lineage")), output_dir / lineage.FILENAME))
    return summary
