"""One audit record per pipeline run (`lineage.json`) and its verification.

The pipeline's last step (`audit`, in both branches of the gate) builds the record from the artifacts the
DAG passed it, so a run on Kubeflow writes the same record as `medtune run` does locally. It links what went
in (data files, base model, config, code, package lock, images) to what came out (every artifact file, the
metrics, the gate decision, the MLflow run and model version, the Hub commit), each by sha256. `verify`
recomputes every hash it can reach (artifacts, data, base model, the lock file at the recorded commit), so a
tampered adapter or a changed data file is named, and compares the record's own sha256 with the tag the
audit step set on the MLflow run and version, so a record edited to match changed files is caught too.

Schema `medtune.lineage/3` (bump the number on any incompatible change; `verify` refuses others):
  schema, created_at
  run        {mlflow_run_id, pipeline_run, kfp_run_id, started_by, runner}; started_by is the pipeline's
             `requested_by` (the user of `medtune run`/`submit`, or "schedule NAME (creator)"), else the OS user
  code       {version, git_sha ("<sha>-dirty" when tracked files differed from it), lock {path, sha256}}
  config     {sha256, resolved}
  images     {step: image}: what each step's pod ran (runner "kubernetes"; each step tags its MLflow run
             with its pod's image); null for kfp.local, which runs every task in the current virtualenv.
             (Schema 2 had {cpu, gpu} from the config, which a run could override without changing the pods.)
  base_model {id, source, revision, commit (Hub snapshot), sha256 (content of the directory or Hub snapshot)}
  data       {path, sha256, files {relative path: sha256}, rows_read, rows_kept, rows_quarantined}; for
             hf:// data also revision (as asked) and commit (of the downloaded snapshot the files are from)
  splits     {name: {rows, fingerprint}}
  artifacts  {"task/output": {uri, sha256, files {relative path: sha256}}}
  metrics    {base, candidate, sft, champion, ci, suites}; sft: the SFT-only result, when a preference stage ran
  preference the preference step's summary: {enabled: false, reason} or {enabled: true, pairs {source, rows_read,
             rows_quarantined, quarantined_by_rule, dropped_by_rule, splits {name: {pairs, fingerprint}}},
             metrics (held-out accuracy and margin before/after, best step)}
  gate       {passed, promote, summary, approved_by}
  mlflow     {tracking_uri, run_id, model_version, model_uri, aliases}
  hub        the push step's result (repo, commit, tags) or null when the gate did not pass
  deployment the deploy step's result: {deployed, name, namespace, generation, image, image_digest,
             served_model, ...} or {deployed: false, skipped: why}; null when the gate did not pass
  trials     every sweep trial (settings, status, metrics, adapter hash), the winner marked; a screened
             sweep's trials carry `screened` {at_step, of_steps} and the winner `finished` {metrics,
             adapter_sha256}: the weights evaluated
  logs       {dir, steps {step: path}}: each step's full output as `medtune run` wrote it (steps up to and
             including this one); null on Kubeflow, where each pod's log stays with the KFP run
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import subprocess
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, Field, ValidationError

from medtune import __version__, digests, uris
from medtune.config import Config, ModelConfig
from medtune.digests import sha256_file
from medtune.images import runner
from medtune.ingest import HF_PREFIX

SCHEMA = "medtune.lineage/3"
FILENAME = "lineage.json"
# The images install from images/constraints.txt and say where it is; a checkout has requirements.lock.
LOCK = Path(os.environ.get("MEDTUNE_LOCK", Path(__file__).resolve().parents[2] / "requirements.lock"))
# Bookkeeping kfp.local writes next to the artifacts; not outputs of medtune.
IGNORED = {"executor_output.json"}
# `medtune run` tells its tasks where it writes their output (logs/<step>.log) so the record can point there.
STEP_LOGS = "MEDTUNE_STEP_LOGS"


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


def source_record(path: str, revision: str | None = None) -> dict:
    """The input data by content. A Hub dataset (hf://owner/name) by the commit of the snapshot the ingest
    downloaded (`revision` may be a branch that moves; the commit does not) and that snapshot's files."""
    from medtune import models

    if path.startswith(HF_PREFIX):
        snapshot = models.hub_snapshot(path.removeprefix(HF_PREFIX), revision, "dataset")
        files = hash_files(snapshot) if snapshot else {}
        return {"path": path, "revision": revision, "commit": snapshot.name if snapshot else None,
                "sha256": tree_digest(files) if snapshot else None, "files": files}
    source = Path(path)
    if not source.exists():
        return {"path": path, "sha256": None, "files": {}}
    files = hash_files(source)
    return {"path": str(source), "sha256": tree_digest(files), "files": files}


def base_model_record(cfg: Config) -> dict:
    """The base model by its content (the local directory, or the cached Hub snapshot) and, from the Hub,
    by the snapshot's commit."""
    from medtune import models

    record = {"id": cfg.model.id, "source": cfg.model.source, "revision": cfg.model.revision,
              "commit": None, "sha256": None}
    if cfg.model.source == "hub":
        snapshot = models.hub_snapshot(cfg.model.id, cfg.model.revision)
        directory, record["commit"] = snapshot, snapshot.name if snapshot else None
    else:
        directory = Path(models.resolve(cfg.model))
    if directory:
        record["sha256"] = tree_digest(hash_files(directory))
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
        "metrics": {k: comparison.get(k) for k in ("base", "candidate", "sft", "champion", "ci", "suites")},
        "preference": documents.get("preference"),
        "gate": {"passed": decision["passed"], "promote": decision.get("promote", False),
                 "summary": decision["summary"],
                 "approved_by": f"gate policy sha256 {cfg.policy_digest()} (automatic; see Config.policy: "
                                        "config.resolved.gate and eval)"},
        "mlflow": {"tracking_uri": uris.redact(run.get("tracking_uri")), "run_id": run["mlflow_run_id"],
                   "model_version": f"{registration['name']}/{registration['version']}" if registration else None,
                   "model_uri": registration["model_uri"] if registration else None,
                   "aliases": registration["aliases"] if registration else []},
        "hub": documents.get("hub"),
        "deployment": documents.get("deployment"),
        # every trial of the sweep: settings, status, metrics, adapter hash; `winner` marks the one evaluated
        # (after `finish`: with its finished metrics and adapter hash when the sweep screened)
        "trials": documents.get("trials"),
        "logs": step_logs(),
    }


def step_logs() -> dict | None:
    """The step log files of this run so far, when `medtune run` writes them (paths, no hashes: the audit
    step's own log is still being written while the record is built)."""
    folder = os.environ.get(STEP_LOGS)
    if not folder:
        return None
    return {"dir": folder, "steps": {path.stem: str(path) for path in sorted(Path(folder).glob("*.log"))}}


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
        try:
            if load(path)["run"]["mlflow_run_id"] == run:
                return path
        except RecordError:
            continue
    raise FileNotFoundError(f"no {FILENAME} for '{run}' (give the output directory, the file or the run id)")


class RecordError(ValueError):
    """A file that is not a verifiable audit record: not JSON, another schema, or fields missing."""


class _Files(BaseModel):
    uri: str
    sha256: str | None
    files: dict[str, str]


class _Record(BaseModel):
    """The fields `verify` reads; the rest of the record is free to grow."""

    class Run(BaseModel):
        mlflow_run_id: str
        runner: str

    class Code(BaseModel):
        class Lock(BaseModel):
            path: str
            sha256: str | None

        git_sha: str
        lock: Lock

    class ConfigPart(BaseModel):
        sha256: str
        resolved: dict

    class BaseModelPart(BaseModel):
        id: str
        commit: str | None
        sha256: str | None

    class Data(BaseModel):
        path: str
        commit: str | None = None
        sha256: str | None
        files: dict[str, str]

    class Mlflow(BaseModel):
        tracking_uri: str | None
        run_id: str
        model_version: str | None

    schema_: str = Field(alias="schema")
    run: Run
    code: Code
    config: ConfigPart
    base_model: BaseModelPart
    data: Data
    artifacts: dict[str, _Files]
    mlflow: Mlflow


def load(path: Path) -> dict:
    """The record at `path`, its shape checked; RecordError naming the file and each bad field otherwise."""
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RecordError(f"{path}: not a readable JSON audit record ({exc})") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path}: not an audit record (a JSON {type(record).__name__}, expected an object)")
    if record.get("schema") != SCHEMA:
        raise RecordError(f"{path}: unknown schema {record.get('schema')!r} (expected {SCHEMA})")
    try:
        _Record.model_validate(record)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise RecordError(f"{path}: malformed audit record: {fields}") from None
    return record


class Verification(NamedTuple):
    problems: list[str]  # one line per mismatch; empty: everything checked matches
    checked: int  # files whose hash was recomputed
    unreachable: list[str]  # artifact URIs in a store this machine cannot read (checked nowhere)
    skipped: tuple[str, ...] = ()  # checks that could not run here, and why


def verify(path: Path, tracking_uri: str | None = None) -> Verification:
    """Recompute every hash the record names that can be reached from here, and compare the record itself
    with the hash the audit step tagged on the MLflow run and model version (at `tracking_uri`)."""
    record = load(path)
    problems, checked, unreachable, skipped = [], 0, [], []
    for artifact in record["artifacts"].values():
        local = _local_path(artifact["uri"])
        if local is None:
            unreachable.append(artifact["uri"])
            continue
        problems += _compare("artifact", artifact["files"], _hash_if_present(local), local)
        checked += len(artifact["files"])
    for check in (_check_data, _check_base_model, _check_code):
        found, count, why = check(record)
        problems, checked, skipped = problems + found, checked + count, skipped + why
    if Config.model_validate(record["config"]["resolved"]).digest() != record["config"]["sha256"]:
        problems.append("config: the resolved config does not match its recorded sha256")
    found, why = _check_tags(path, record, tracking_uri)
    return Verification(problems + found, checked, unreachable, tuple(skipped + why))


Check = tuple[list[str], int, list[str]]  # problems, files hashed, checks skipped (why)


def _check_data(record: dict) -> Check:
    from medtune import models

    data = record["data"]
    if data["sha256"] is None:
        return [], 0, [f"data: {data['path']} has no recorded hash (it was not readable where the run hashed it)"]
    if data["path"].startswith(HF_PREFIX):
        root = models.hub_snapshot(data["path"].removeprefix(HF_PREFIX), data["commit"], "dataset")
        if root is None:
            return [], 0, [f"data: {data['path']}@{data['commit']} is not in this machine's Hub cache"]
    else:
        root = Path(data["path"])
        if not root.exists():
            return [f"data: {root} is missing"], 0, []
    return _compare("data file", data["files"], hash_files(root), root), len(data["files"]), []


def _check_base_model(record: dict) -> Check:
    """The base model's content again: the cached Hub snapshot of the recorded commit, or the directory."""
    from medtune import models

    base = record["base_model"]
    if base["sha256"] is None:
        return [], 0, [f"base model {base['id']}: no content hash recorded"]
    model = ModelConfig.model_validate(record["config"]["resolved"]["model"])
    if model.source == "hub":
        directory = models.hub_snapshot(model.id, base["commit"] or model.revision)
    else:
        directory = Path(model.id).expanduser() if model.source == "path" else models.gguf_dir(model)
    if directory is None or not directory.is_dir():
        return [], 0, [f"base model {base['id']}@{base['commit'] or model.revision}: not on this machine"]
    files = hash_files(directory)
    if tree_digest(files) != base["sha256"]:
        return [f"base model changed: {directory} (sha256 {tree_digest(files)[:12]}..., recorded "
                f"{base['sha256'][:12]}...)"], len(files), []
    return [], len(files), []


# The lock the record names, by where it lives in the repository (images install from constraints.txt).
LOCK_PATHS = {"requirements.lock": "requirements.lock", "constraints.txt": "images/constraints.txt"}


def _check_code(record: dict) -> Check:
    """The recorded commit must exist in this checkout and its lock file must hash as recorded."""
    sha, lock = record["code"]["git_sha"], record["code"]["lock"]
    if not re.fullmatch(r"[0-9a-f]{40}", sha):
        why = "uncommitted changes on top of " + sha.removesuffix("-dirty") if sha.endswith("-dirty") else sha
        return [], 0, [f"code: the run's code cannot be recomputed ({why})"]
    root = LOCK.parent

    def git(*args: str) -> bytes | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout if done.returncode == 0 else None

    if git("cat-file", "-e", f"{sha}^{{commit}}") is None:
        return [], 0, [f"code: commit {sha} is not in the checkout at {root}"]
    if lock["sha256"] is None or lock["path"] not in LOCK_PATHS:
        return [], 0, [f"code: no lock file recorded ({lock['path']})"]
    content = git("show", f"{sha}:{LOCK_PATHS[lock['path']]}")
    actual = hashlib.sha256(content).hexdigest() if content is not None else None
    if actual != lock["sha256"]:
        return [f"code: {lock['path']} at commit {sha[:12]} hashes to {str(actual)[:12]}..., recorded "
                f"{lock['sha256'][:12]}... (the run's packages are not the commit's)"], 1, []
    return [], 1, []


TAG = "medtune.lineage_sha256"


def _check_tags(path: Path, record: dict, tracking_uri: str | None) -> tuple[list[str], list[str]]:
    """The record's own hash against the tag the audit step set on the run and the model version, so a
    record edited after the run (hashes and all) is caught; skipped, saying so, when MLflow is not reachable."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from medtune.local_server import answers_mlflow

    run_id, version = record["mlflow"]["run_id"], record["mlflow"]["model_version"]
    if not tracking_uri or not answers_mlflow(tracking_uri):
        return [], [f"MLflow at {uris.redact(tracking_uri) or '(none given)'} is not reachable: {path.name}'s "
                    f"sha256 was not compared with the {TAG} tag of run {run_id}"
                    + (f" and model version {version}" if version else "")]
    digest = sha256_file(path)
    client = mlflow.MlflowClient(tracking_uri)
    tagged = {}
    try:
        tagged[f"MLflow run {run_id}"] = client.get_run(run_id).data.tags.get(TAG)
        if version:
            name, number = version.rsplit("/", 1)
            tagged[f"model version {version}"] = client.get_model_version(name, number).tags.get(TAG)
    except MlflowException as exc:
        return [f"MLflow at {uris.redact(tracking_uri)}: {exc.message.splitlines()[0]}"], []
    return [f"{path.name}: sha256 {digest[:12]}... differs from the {TAG} tag on {where} "
            f"({str(tag)[:12]}...): the record was changed after the run" for where, tag in tagged.items()
            if tag != digest], []


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
