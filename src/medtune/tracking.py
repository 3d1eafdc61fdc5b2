"""MLflow plumbing: a local tracking server for `medtune run`, one parent run per pipeline run, and a
nested run per step, so one run page answers what data, code and config produced a model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow

from medtune import __version__, digests, images, tags
from medtune.config import Config


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usual_port(state_dir: Path) -> int:
    """A port derived from the store's path (15000-24999): stable across runs and `medtune ui` for one store."""
    import hashlib

    return 15000 + int(hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest(), 16) % 10000


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # as the server binds: a port a stopped server left in TIME_WAIT is free for the next one
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def experiments(uri: str) -> list[tuple[str, str]]:
    """(id, name) of the server's active experiments, newest first."""
    found = mlflow.MlflowClient(uri).search_experiments(order_by=["creation_time DESC"])
    return [(e.experiment_id, e.name) for e in found]


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the server and its workers (its own process group); it may already be stopping."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def local_server(state_dir: Path, timeout_s: float = 120, port: int | None = None) -> Iterator[str]:
    """A real MLflow server on loopback backed by SQLite in `state_dir`; reused if one already serves it.

    Only a server this call started is stopped when it ends. It listens on the store's usual port when that
    is free, so the links a run printed work again on the server `medtune ui` starts later.
    """
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / "server.json"
    if state_file.exists():
        uri = json.loads(state_file.read_text())["uri"]
        if healthy(uri):
            yield uri
            return
    port = port or usual_port(state_dir)
    if not _port_free(port):
        port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    log = (state_dir / "server.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{state_dir / 'mlflow.db'}",
         "--artifacts-destination", str(state_dir / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        # The GenAI job runner forks eight more Python processes; tracking and the registry don't need it.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    try:
        deadline = time.monotonic() + timeout_s
        while not healthy(uri):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"MLflow server did not start; see {state_dir / 'server.log'}")
            time.sleep(0.5)
        state_file.write_text(json.dumps({"uri": uri, "pid": proc.pid}))
        yield uri
    finally:
        state_file.unlink(missing_ok=True)
        _stop_group(proc)
        log.close()


def identity(cfg: Config) -> dict[str, str]:
    """What produced a run (and each model version it registers): code, config, base model, runner."""
    return {tags.VERSION: __version__, tags.GIT_SHA: digests.git_sha(), tags.CONFIG_SHA256: cfg.digest(),
            tags.BASE_MODEL: cfg.model.id, tags.BASE_MODEL_REVISION: cfg.model.revision,
            tags.RUNNER: images.runner()}


def _connect(cfg: Config) -> None:
    if cfg.tracking.tracking_uri:
        mlflow.set_tracking_uri(cfg.tracking.tracking_uri)
    mlflow.set_experiment(cfg.tracking.experiment)


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return flat


def open_run(cfg: Config, pipeline_run: str, kfp_run_id: str = "", requested_by: str = "") -> str:
    """Create the parent run that every step of this pipeline run logs under.

    `requested_by` is who asked for the run (`medtune run`/`submit` pass the local user, a schedule names
    itself and its creator); in a task pod the OS user is the image's, which says nothing."""
    _connect(cfg)
    run_tags = {**identity(cfg), tags.PIPELINE_RUN: pipeline_run, tags.KFP_RUN_ID: kfp_run_id,
                tags.REQUESTED_BY: requested_by}
    with mlflow.start_run(run_name=f"{cfg.name}-{pipeline_run}", tags=run_tags) as run:
        params = _flatten(cfg.model_dump(mode="json"))
        # MLflow caps a batch at 100 params.
        keys = sorted(params)
        for i in range(0, len(keys), 100):
            mlflow.log_params({k: params[k][:6000] for k in keys[i:i + 100]})
        mlflow.log_dict(cfg.model_dump(mode="json"), "config/resolved.json")
        return run.info.run_id


@contextmanager
def step(cfg: Config, parent_run_id: str, name: str) -> Iterator[mlflow.ActiveRun]:
    """A nested run for one pipeline step under the parent run, tagged with the image its pod runs."""
    _connect(cfg)
    image = images.current()
    with mlflow.start_run(run_id=parent_run_id):
        with mlflow.start_run(run_name=name, nested=True,
                              tags={tags.STEP: name, **({tags.IMAGE: image} if image else {})}) as child:
            yield child


def images_ran(parent_run_id: str) -> dict[str, str] | None:
    """{step: image} the run's steps tagged so far (their pods' images); None when none ran in a pod."""
    found = mlflow.search_runs(filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'", output_format="list",
                               experiment_ids=[mlflow.MlflowClient().get_run(parent_run_id).info.experiment_id])
    ran = {r.data.tags[tags.STEP]: r.data.tags[tags.IMAGE] for r in found if tags.IMAGE in r.data.tags}
    return dict(sorted(ran.items())) or None


def log_parent_metrics(parent_run_id: str, values: dict[str, float], prefix: str) -> None:
    client = mlflow.MlflowClient()
    for key, value in values.items():
        client.log_metric(parent_run_id, f"{prefix}{key}", float(value))
