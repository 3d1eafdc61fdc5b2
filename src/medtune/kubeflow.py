"""Submit the pipeline to Kubeflow Pipelines and keep its recurring run, through `kfp.Client`.

Both entry points compile the pipeline from the given profile (so its `cluster:` section decides images and
placement), upload it as a new version of the one pipeline named `cluster.pipeline_name`, and pass the
profile as the run's `config` parameter. Only names of Secrets and env vars travel: no secret value is read
here, except the optional API token in $KFP_TOKEN, which goes to the client and nowhere else.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medtune import __version__, digests
from medtune import config as config_mod

TOKEN_ENV = "KFP_TOKEN"
DEFAULT_SCHEDULE = Path("manifests/recurring-run.yaml")  # relative to the working directory, like the profiles


class KubeflowError(RuntimeError):
    """The KFP API refused or could not be reached; the message says which call."""


class RecurringRunSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    description: str = ""
    cron: str
    max_concurrency: int = Field(1, ge=1, le=10)
    no_catchup: bool = True
    profile: str = "configs/qwen2.5-0.5b-qlora.yaml"

    @field_validator("cron")
    @classmethod
    def _six_fields(cls, value: str) -> str:
        return normalise_cron(value)


def normalise_cron(cron: str) -> str:
    """KFP's cron has a seconds field first; a classic 5-field expression gets `0` seconds."""
    fields = cron.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise ValueError(f"cron '{cron}': expected 6 fields (sec min hour day month weekday) or the classic 5")
    return " ".join(fields)


def load_schedule(path: Path = DEFAULT_SCHEDULE, cron: str | None = None) -> RecurringRunSpec:
    tree = yaml.safe_load(Path(path).read_text()) or {}
    if cron:
        tree["cron"] = cron
    try:
        return RecurringRunSpec.model_validate(tree)
    except ValueError as exc:
        raise KubeflowError(f"{path}: {exc}") from None


def connect(host: str, namespace: str | None = None):
    import kfp

    token = os.environ.get(TOKEN_ENV) or None
    with _api(f"connecting to {host}"):
        return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token)


@contextlib.contextmanager
def _quiet():
    """kfp.Client prints links on stdout; keep stdout for the URL our commands print."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


@contextlib.contextmanager
def _api(call: str):
    try:
        with _quiet():
            yield
    except KubeflowError:
        raise
    except Exception as exc:  # kfp_server_api.ApiException, urllib3 errors, ValueError from kfp.Client
        status = getattr(exc, "status", None)
        reason = getattr(exc, "reason", None) or str(exc).splitlines()[0]
        raise KubeflowError(f"{call} failed: {f'HTTP {status} ' if status else ''}{reason}") from None


def version_name() -> str:
    sha, dirty, _ = digests.git_sha().partition("-dirty")
    return f"{__version__}-{sha[:12]}{dirty}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


def compile_package(cfg: config_mod.Profile, directory: Path) -> Path:
    from kfp import compiler

    from medtune.pipeline import build

    path = directory / "medtune.yaml"
    compiler.Compiler().compile(build(cfg), package_path=str(path))
    return path


def upload(client, package: Path, pipeline_name: str, version: str) -> tuple[str, str]:
    """A new version of the pipeline `pipeline_name` (created on first upload); returns both ids."""
    with _api("finding the pipeline"):
        pipeline_id = client.get_pipeline_id(pipeline_name)
    if pipeline_id is None:
        with _api("uploading the pipeline"):
            pipeline = client.upload_pipeline(str(package), pipeline_name=pipeline_name,
                                              description=f"medtune {__version__}")
            pipeline_id = pipeline.pipeline_id
            versions = client.list_pipeline_versions(pipeline_id, page_size=1, sort_by="created_at desc")
        return pipeline_id, versions.pipeline_versions[0].pipeline_version_id
    with _api("uploading a pipeline version"):
        created = client.upload_pipeline_version(str(package), pipeline_version_name=version,
                                                 pipeline_id=pipeline_id)
    return pipeline_id, created.pipeline_version_id


def experiment_id(client, name: str, namespace: str | None) -> str:
    with _api("creating the experiment"):
        return client.create_experiment(name, namespace=namespace).experiment_id


def ui_url(client, fragment: str) -> str:
    return f"{client._get_url_prefix().rstrip('/')}/#/{fragment}"


def publish(client, cfg: config_mod.Profile) -> tuple[str, str, str]:
    """Compile the pipeline from `cfg`, upload it as a new version; return pipeline, version and experiment ids."""
    cluster = cfg.cluster
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_package(cfg, Path(tmp))
        pipeline_id, version_id = upload(client, package, cluster.pipeline_name, version_name())
    return pipeline_id, version_id, experiment_id(client, cluster.experiment, cluster.namespace)


def submit(client, cfg: config_mod.Profile, run_name: str | None = None) -> dict:
    cluster = cfg.cluster
    pipeline_id, version_id, exp = publish(client, cfg)
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
    with _api("starting the run"):
        params = {"config": cfg.to_json(), "requested_by": digests.requester()}
        run = client.run_pipeline(exp, run_name, params=params, pipeline_id=pipeline_id,
                                  version_id=version_id, service_account=cluster.service_account)
    return {"run_id": run.run_id, "url": ui_url(client, f"runs/details/{run.run_id}"),
            "pipeline_id": pipeline_id, "version_id": version_id, "experiment_id": exp}


def schedule(client, cfg: config_mod.Profile, spec: RecurringRunSpec) -> dict:
    """Create the recurring run `spec.name`, replacing one of that name (KFP cannot edit a recurring run)."""
    cluster = cfg.cluster
    pipeline_id, version_id, exp = publish(client, cfg)
    same_name = json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name",
                                            "stringValue": spec.name}]})
    with _api("listing recurring runs"):
        existing = client.list_recurring_runs(experiment_id=exp, page_size=100, filter=same_name).recurring_runs
    replaced = [r.recurring_run_id for r in existing or [] if r.display_name == spec.name]
    with _api("creating the recurring run"):
        created = client.create_recurring_run(
            exp, spec.name, description=spec.description, cron_expression=spec.cron,
            max_concurrency=spec.max_concurrency, no_catchup=spec.no_catchup,
            params={"config": cfg.to_json(), "requested_by": f"schedule {spec.name} ({digests.requester()})"},
            pipeline_id=pipeline_id, version_id=version_id, enabled=True, service_account=cluster.service_account)
    # Delete the old one only once the new one exists: a failed create leaves the old schedule running.
    for old in replaced:
        with _api(f"deleting the replaced recurring run {old}"):
            client.delete_recurring_run(old)
    rid = created.recurring_run_id
    return {"recurring_run_id": rid, "url": ui_url(client, f"recurringrun/details/{rid}"), "cron": spec.cron,
            "replaced": replaced, "pipeline_id": pipeline_id, "version_id": version_id, "experiment_id": exp}
