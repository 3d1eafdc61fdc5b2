"""One audit record per pipeline run (`lineage.json`) and its verification.

The pipeline's last step (`audit`, in both branches of the gate) builds the record from the artifacts the
DAG passed it, so a run on Kubeflow writes the same record as `medtune run` does locally. It links what went
in (data files, base model, config, code, package lock, images) to what came out (every artifact file, the
metrics, the gate decision, the MLflow run and model version, the Hub commit), each by sha256. `verify`
recomputes every hash it can reach, so a tampered adapter or a changed data file is named.

Schema `medtune.lineage/3` (bump the number on any incompatible change; `verify` refuses others):
  schema, created_at
  run        {mlflow_run_id, pipeline_run, kfp_run_id, started_by, runner}; started_by is the pipeline's
             `requested_by` (the user of `medtune run`/`submit`, or "schedule NAME (creator)"), else the OS user
  code       {version, git_sha ("<sha>-dirty" when tracked files differed from it), lock {path, sha256}}
  config     {sha256, resolved}
  images     {step: image}: what each step's pod ran (runner "kubernetes"; each step tags its MLflow run
             with its pod's image); null for kfp.local, which runs every task in the current virtualenv.
             (Schema 2 had {cpu, gpu} from the config, which a run could override without changing the pods.)
  base_model {id, source, revision, commit (Hub snapshot), sha256 (local directory content)}
  data       {path, sha256, files {relative path: sha256}, rows_read, rows_kept, rows_quarantined}
  splits     {name: {rows, fingerprint}}
  artifacts  {"task/output": {uri, sha256, files {relative path: sha256}}}
  metrics    {base, candidate, champion, ci}
  gate       {passed, promote, summary, approved_by}
  mlflow     {tracking_uri, run_id, model_version, model_uri, aliases}
  hub        the push step's result (repo, commit, tags) or null when the gate did not pass
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import NamedTuple

from medtune import __version__, digests
from medtune.config import Config
from medtune.digests import sha256_file
from medtune.images import runner

SCHEMA = "medtune.lineage/3"
FILENAME = "lineage.json"
# The images install from images/constraints.txt and say where it is; a checkout has requirements.lock.
LOCK = Path(os.environ.get("MEDTUNE_LOCK", Path(__file__).resolve().parents[2] / "requirements.lock"))
# Bookkeeping kfp.local writes next to the artifacts; not outputs of medtune.
IGNORED = {"executor_output.json"}


class Stored(NamedTuple):
    """An artifact as a step sees it: where the store keeps it (uri) and where this process reads it."""
    uri: str
    path: Path


def hash_files(root: Path) -> dict[str, str]:
    """sha256 of each file under `root` (or of `root` itself), keyed by path relative to `root`."""
    if root.is_file():
        return {root.name: sha256_file(root)}
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and p.name not in IGNORED)
    # .cache/ inside a model or data folder is the hub client's bookkeeping, not content.
    return {str(p.relative_to(root)): sha256_file(p) for p in files if ".cache" not in p.relative_to(root).parts}


def tree_digest(files: dict[str, str]) -> str:
    """One hash for a set of files: order-independent, and it changes when a name or content changes."""
    return hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode()).hexdigest()


def source_record(path: str) -> dict:
    """The input data by content; a Hub dataset id (not a path here) is identified by id and revision."""
    source = Path(path)
    if not source.exists():
        return {"path": path, "sha256": None, "files": {}}
    files = hash_files(source)
    return {"path": str(source), "sha256": tree_digest(files), "files": files}


def base_model_record(cfg: Config) -> dict:
    """The base model: a local directory by its content, a Hub model by the snapshot commit in the cache."""
    from medtune import models

    record = {"id": cfg.model.id, "source": cfg.model.source, "revision": cfg.model.revision,
              "commit": None, "sha256": None}
    if cfg.model.source == "hub":
        record["commit"] = models.hub_commit(cfg.model)
    else:
        record["sha256"] = tree_digest(hash_files(Path(models.resolve(cfg.model))))
    return record


def build(cfg: Config, run: dict, artifacts: dict[str, Stored], documents: dict[str, dict],
          images: dict[str, str] | None) -> dict:
    """The record for one pipeline run from the artifacts its steps wrote (keyed "task/output").

    `run` carries mlflow_run_id, pipeline_run, kfp_run_id, started_by and tracking_uri; `documents` the JSON
    outputs this reads, by role (validation, splits, comparison, decision, and registration and hub when
    the gate passed; each step's spec says which output plays which role); `images` what each step's pod
    ran (None under kfp.local).
    """
    validation = documents["validation"]["summary"]
    splits = documents["splits"]["splits"]
    comparison = documents["comparison"]
    decision = documents["decision"]
    registration = documents.get("registration")
    return {
        "schema": SCHEMA,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run": {"mlflow_run_id": run["mlflow_run_id"], "pipeline_run": run["pipeline_run"],
                "kfp_run_id": run["kfp_run_id"], "started_by": run.get("started_by"),
                "runner": runner()},
        "code": {"version": __version__, "git_sha": digests.git_sha(),
                 "lock": {"path": LOCK.name, "sha256": sha256_file(LOCK) if LOCK.exists() else None}},
        "config": {"sha256": cfg.digest(), "resolved": json.loads(cfg.to_json())},
        "images": images,
        "base_model": base_model_record(cfg),
        "data": {**validation["source"],
                 **{k: validation[k] for k in ("rows_read", "rows_kept", "rows_quarantined")}},
        "splits": {name: {"rows": s["rows"], "fingerprint": s["fingerprint"]} for name, s in splits.items()},
        "artifacts": {key: _artifact(stored) for key, stored in sorted(artifacts.items())},
        "metrics": {k: comparison.get(k) for k in ("base", "candidate", "champion", "ci", "suites")},
        "gate": {"passed": decision["passed"], "promote": decision.get("promote", False),
                 "summary": decision["summary"],
                 "approved_by": f"gate policy sha256 {cfg.policy_digest()} (automatic; see Config.policy: "
                                        "config.resolved.gate and eval)"},
        "mlflow": {"tracking_uri": run.get("tracking_uri"), "run_id": run["mlflow_run_id"],
                   "model_version": f"{registration['name']}/{registration['version']}" if registration else None,
                   "model_uri": registration["model_uri"] if registration else None,
                   "aliases": registration["aliases"] if registration else []},
        "hub": documents.get("hub"),
        # every trial of the sweep: settings, status, metrics, adapter hash; `winner` marks the one evaluated
        "trials": documents.get("trials"),
    }


def _artifact(stored: Stored) -> dict:
    files = hash_files(stored.path)
    return {"uri": stored.uri, "sha256": tree_digest(files), "files": files}


def write(record: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def find(run: str, runs_dir: Path = Path("runs")) -> Path:
    """A run's lineage.json from its output directory, the file itself, or its MLflow run id."""
    candidate = Path(run)
    if candidate.is_file():
        return candidate
    if (candidate / FILENAME).exists():
        return candidate / FILENAME
    for path in sorted(runs_dir.glob(f"*/{FILENAME}")):
        if json.loads(path.read_text())["run"]["mlflow_run_id"] == run:
            return path
    raise FileNotFoundError(f"no {FILENAME} for '{run}' (give the output directory, the file or the run id)")


class Verification(NamedTuple):
    problems: list[str]  # one line per mismatch; empty: everything checked matches
    checked: int  # files whose hash was recomputed
    unreachable: list[str]  # artifact URIs in a store this machine cannot read (checked nowhere)


def verify(path: Path) -> Verification:
    """Recompute every hash the record names that can be reached from here."""
    record = json.loads(path.read_text())
    if record.get("schema") != SCHEMA:
        return Verification([f"{path}: unknown schema {record.get('schema')!r} (expected {SCHEMA})"], 0, [])
    problems, checked, unreachable = [], 0, []
    for artifact in record["artifacts"].values():
        local = _local_path(artifact["uri"])
        if local is None:
            unreachable.append(artifact["uri"])
            continue
        problems += _compare("artifact", artifact["files"], _hash_if_present(local), local)
        checked += len(artifact["files"])
    data = record["data"]
    if data["sha256"] is not None:
        data_path = Path(data["path"])
        if not data_path.exists():
            problems.append(f"data: {data_path} is missing")
        else:
            problems += _compare("data file", data["files"], hash_files(data_path), data_path)
            checked += len(data["files"])
    if Config.model_validate(record["config"]["resolved"]).digest() != record["config"]["sha256"]:
        problems.append("config: the resolved config does not match its recorded sha256")
    return Verification(problems, checked, unreachable)


def _local_path(uri: str) -> Path | None:
    """kfp.local stores artifacts at plain paths; minio://, s3://, gs:// are read inside the cluster."""
    path = Path(uri.removeprefix("file://"))
    return path if path.is_absolute() and "://" not in uri.removeprefix("file://") else None


def _hash_if_present(path: Path) -> dict[str, str]:
    return hash_files(path) if path.exists() else {}


def _compare(kind: str, recorded: dict[str, str], actual: dict[str, str], root: Path) -> list[str]:
    problems = []
    for name in sorted(recorded.keys() | actual.keys()):
        where = root if root.is_file() or (not root.exists() and name == root.name) else root / name
        if name not in actual:
            problems.append(f"{kind} missing: {where}")
        elif name not in recorded:
            problems.append(f"{kind} added after the run: {where}")
        elif recorded[name] != actual[name]:
            problems.append(f"{kind} changed: {where} (sha256 {actual[name][:12]}..., "
                            f"recorded {recorded[name][:12]}...)")
    return problems
