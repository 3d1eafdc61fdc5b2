"""MLflow plumbing: a local tracking server for `medtune run`, one parent run per pipeline run, and a
nested run per step, so one run page answers what data, code and config produced a model."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

import mlflow

from medtune import __version__, digests, images, tags
from medtune.config import Config
from medtune.local_server import ServerError, local_server  # noqa: F401 (what `medtune run` starts or joins)


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def experiments(uri: str) -> list[tuple[str, str]]:
    """(id, name) of the server's active experiments, newest first."""
    found = mlflow.MlflowClient(uri).search_experiments(order_by=["creation_time DESC"])
    return [(e.experiment_id, e.name) for e in found]


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
