"""Local runs after the fact: `medtune runs` (one line each), `medtune show RUN`, and MLflow links.

Each `medtune run` leaves `runs/<name>/run.json`; these read only those files, so they work with no server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

HEADLINE = ("rougeL", "token_f1", "accuracy")


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """The MLflow UI's page of a run (the UI needs the experiment id in the route)."""
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def experiment_url(tracking_uri: str, experiment_id: str) -> str:
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}"


def find(run: str, root: Path = Path("runs")) -> Path:
    """run.json of a run named by its folder, its name under `root`, or its MLflow run id."""
    for candidate in (Path(run), root / run):
        if (candidate / "run.json").is_file():
            return candidate / "run.json"
        if candidate.name == "run.json" and candidate.is_file():
            return candidate
    for path in sorted(root.glob("*/run.json")):
        if json.loads(path.read_text()).get("run_id") == run:
            return path
    raise FileNotFoundError(f"no run '{run}': not a run folder, a name under {root}/ or an MLflow run id there")


def load(root: Path = Path("runs")) -> list[dict]:
    """Every run under `root`, oldest first, each with its folder name."""
    runs = []
    for path in sorted(root.glob("*/run.json")):
        try:
            summary = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue  # a run still being written, or a damaged file: `show` names it
        finished = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(path.stat().st_mtime))
        runs.append({"finished_at": finished, **summary, "name": path.parent.name})
    return runs


def headline(summary: dict) -> str:
    """base -> candidate for the metrics people compare first."""
    metrics = summary.get("metrics") or {}
    base, candidate = metrics.get("base") or {}, metrics.get("candidate") or {}
    parts = [f"{m} {base[m]:.3f}->{candidate[m]:.3f}" for m in HEADLINE if m in base and m in candidate]
    return ", ".join(parts)


def row(summary: dict) -> dict[str, str]:
    gate = summary.get("gate") or {}
    registration = summary.get("registration") or {}
    return {
        "run": summary["name"],
        "date": summary.get("finished_at", "")[:16].replace("T", " "),
        "profile": summary.get("profile", ""),
        "gate": "passed" if gate.get("passed") else "failed" if gate else "?",
        "metrics": headline(summary),
        "model version": summary.get("model_version") or "-",
        "alias": ",".join(registration.get("aliases") or []) or "-",
    }


def describe(summary: dict) -> list[tuple[str, str]]:
    """One run's summary as label/value lines, for `medtune show`."""
    gate = summary.get("gate") or {}
    hub = summary.get("hub") or {}
    lines = [("run", summary.get("name", "")), ("finished", summary.get("finished_at", "")),
             ("profile", summary.get("profile", "")),
             ("gate", f"{'PASSED' if gate.get('passed') else 'FAILED'} - {gate.get('summary', '')}"),
             ("metrics", headline(summary)),
             ("model version", summary.get("model_version") or "none (not registered)"),
             ("aliases", ", ".join((summary.get("registration") or {}).get("aliases") or []) or "-"),
             ("hub", f"{hub.get('repo_id')}@{hub.get('commit')}" if hub.get("commit") else hub.get("reason", "-")),
             ("report", summary.get("report", "")), ("adapter", summary.get("adapter", "")),
             ("lineage", summary.get("lineage", "")), ("logs", summary.get("logs", "")),
             ("mlflow run", summary.get("mlflow_run", ""))]
    return [(k, str(v)) for k, v in lines if v not in (None, "")]
