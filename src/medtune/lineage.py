"""One audit record per run (`lineage.json`) and its verification.

The record links what went in (data files, base model, config, code, package lock, images) to what came out
(every artifact file, metrics, gate decision, MLflow run and model version, Hub commit), each by sha256.
`verify` recomputes every hash it can reach, so a tampered adapter or a changed data file is named.

Schema `medtune.lineage/1` (bump the number on any incompatible change):
  schema, created_at, run {run_id, output_dir, pipeline_run}, code {version, git_sha, lock_sha256},
  config {sha256, resolved}, images {cpu, gpu}, base_model {id, source, revision, sha256},
  data {path, sha256, files}, splits {name: {rows, fingerprint}}, artifacts {"task/name/file": sha256},
  metrics {base, candidate}, gate {passed, summary}, mlflow {tracking_uri, run_id, model_version}, hub {...}
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

from medtune import __version__, images, tracking
from medtune.digests import sha256_file
from medtune.config import Config

SCHEMA = "medtune.lineage/1"
FILENAME = "lineage.json"
LOCK = Path(__file__).resolve().parents[2] / "requirements.lock"
# Bookkeeping kfp.local writes next to the artifacts; not outputs of medtune.
IGNORED = {"executor_output.json"}


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


def _artifact_files(output_dir: Path) -> dict[str, str]:
    # Keys read artifacts/<pipeline run>/<task>/<artifact>[/<file>] relative to artifacts/.
    return hash_files(output_dir / "artifacts")


def _base_model(cfg: Config) -> dict:
    from medtune import models

    record = {"id": cfg.model.id, "source": cfg.model.source, "revision": cfg.model.revision}
    if cfg.model.source != "hub":  # a local directory is identified by its content, not its name
        record["sha256"] = tree_digest(hash_files(Path(models.resolve(cfg.model))))
    return record


def _data(cfg: Config) -> dict:
    path = Path(cfg.data.path)
    if not path.exists():  # a Hub dataset id: identified by id and revision in the config
        return {"path": cfg.data.path, "sha256": None, "files": {}}
    files = hash_files(path)
    return {"path": str(path), "sha256": tree_digest(files), "files": files}


def build(cfg: Config, summary: dict, pipeline_run: str | None = None) -> dict:
    output_dir = Path(summary["output_dir"])
    preprocess = next(output_dir.glob("artifacts/*/preprocess/summary"), None)
    splits = json.loads(preprocess.read_text())["splits"] if preprocess else {}
    return {
        "schema": SCHEMA,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "run": {"run_id": summary["run_id"], "output_dir": str(output_dir), "pipeline_run": pipeline_run},
        "code": {"version": __version__, "git_sha": tracking.code_version(),
                 "lock_sha256": sha256_file(LOCK) if LOCK.exists() else None},
        "config": {"sha256": cfg.digest(), "resolved": json.loads(cfg.to_json())},
        "images": {"cpu": images.CPU_IMAGE, "gpu": images.GPU_IMAGE},
        "base_model": _base_model(cfg),
        "data": _data(cfg),
        "splits": {name: {"rows": s["rows"], "fingerprint": s["fingerprint"]} for name, s in splits.items()},
        "artifacts": _artifact_files(output_dir),
        "metrics": summary.get("metrics"),
        "gate": summary.get("gate"),
        "mlflow": {"tracking_uri": summary.get("tracking_uri"), "run_id": summary["run_id"],
                   "model_version": summary.get("model_version")},
        "hub": summary.get("hub"),
    }


def write(record: dict, output_dir: Path) -> Path:
    path = output_dir / FILENAME
    path.write_text(json.dumps(record, indent=2, sort_keys=True))
    return path


def find(run: str, runs_dir: Path = Path("runs")) -> Path:
    """A run's lineage.json from its output directory or its MLflow run id."""
    candidate = Path(run)
    if (candidate / FILENAME).exists():
        return candidate / FILENAME
    for path in sorted(runs_dir.glob(f"*/{FILENAME}")):
        if json.loads(path.read_text())["run"]["run_id"] == run:
            return path
    raise FileNotFoundError(f"no {FILENAME} for '{run}' (give the output directory or the run id)")


def verify(path: Path) -> list[str]:
    """Recompute every hash the record names; return one line per mismatch (empty: all verified)."""
    record = json.loads(path.read_text())
    if record.get("schema") != SCHEMA:
        return [f"{path}: unknown schema {record.get('schema')!r} (expected {SCHEMA})"]
    problems = []
    output_dir = Path(record["run"]["output_dir"])
    problems += _compare("artifact", record["artifacts"], _artifact_files(output_dir), output_dir / "artifacts")
    data = record["data"]
    if data["sha256"] is not None:
        data_path = Path(data["path"])
        if not data_path.exists():
            problems.append(f"data: {data_path} is missing")
        else:
            problems += _compare("data file", data["files"], hash_files(data_path), data_path)
    if Config.model_validate(record["config"]["resolved"]).digest() != record["config"]["sha256"]:
        problems.append("config: the resolved config does not match its recorded sha256")
    return problems


def _compare(kind: str, recorded: dict[str, str], actual: dict[str, str], root: Path) -> list[str]:
    problems = []
    for name in sorted(recorded.keys() | actual.keys()):
        if name not in actual:
            problems.append(f"{kind} missing: {root / name}")
        elif name not in recorded:
            problems.append(f"{kind} added after the run: {root / name}")
        elif recorded[name] != actual[name]:
            problems.append(f"{kind} changed: {root / name} (sha256 {actual[name][:12]}..., "
                            f"recorded {recorded[name][:12]}...)")
    return problems
