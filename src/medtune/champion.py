"""Find the current champion: the registered model version carrying the MLflow alias `champion`.

The registered model is a pyfunc (see `medtune.registry`) whose artifacts hold the LoRA adapter and the
config it was trained with; downloading them gives an adapter directory and the base model it needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from medtune import config as config_mod
from medtune import tags

ALIAS = "champion"


@dataclass
class Champion:
    name: str
    version: str
    run_id: str | None
    adapter_dir: Path  # its trained weights: an adapter, or a full model (train.method full)
    model: config_mod.ModelConfig | None  # the base model it was trained on (None: not recorded)

    def info(self) -> dict:
        return {"available": True, "name": self.name, "version": self.version, "run_id": self.run_id,
                "alias": ALIAS, "base_model": self.model.id if self.model else None, "reason": ""}


def _not_found(exc: MlflowException) -> bool:
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND") or "not found" in str(exc).lower()


def lookup(registered_model: str, ref: str = ALIAS) -> dict:
    """The version record for an alias (default `champion`) or a version number, or why there is none.
    Errors other than "not found" propagate."""
    client = mlflow.MlflowClient()
    try:
        version = client.get_model_version(registered_model, ref) if ref.isdigit() else \
            client.get_model_version_by_alias(registered_model, ref)
    except MlflowException as exc:
        if _not_found(exc):
            reason = f"{registered_model} has no version {ref}" if ref.isdigit() else \
                f"no version of {registered_model} has alias '{ref}'"
            return {"available": False, "name": registered_model, "version": None, "run_id": None,
                    "alias": ref, "reason": reason}
        raise
    return {"available": True, "name": registered_model, "version": str(version.version),
            "run_id": version.run_id or version.tags.get(tags.RUN_ID), "alias": ref, "reason": ""}


def fetch(registered_model: str, dest: Path, ref: str = ALIAS) -> tuple[Champion | None, dict]:
    """Download the adapter and config of the version `ref` names (alias or number, default the champion)
    under `dest`; (None, why) when there is no such version."""
    info = lookup(registered_model, ref)
    if not info["available"]:
        return None, info
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{registered_model}/{info['version']}", dst_path=str(dest)))
    # The trained weights: an adapter (lora/qlora), else a full model directory (train.method full).
    weights = sorted(p.parent for p in local.rglob("adapter_config.json")) or \
        sorted(p.parent for p in local.rglob("config.json") if "architectures" in json.loads(p.read_text()))
    if not weights:
        raise FileNotFoundError(f"{registered_model} version {info['version']}: no adapter or model weights in "
                                f"its artifacts ({local})")
    model = None
    for path in local.rglob("config.json"):
        tree = json.loads(path.read_text())
        if isinstance(tree, dict) and isinstance(tree.get("model"), dict) and "train" in tree:
            # Only the model section is needed; an older config schema must not make the champion unusable.
            model = config_mod.ModelConfig.model_validate(tree["model"])
            break
    champion = Champion(name=registered_model, version=info["version"], run_id=info["run_id"],
                        adapter_dir=weights[0], model=model)
    return champion, {**champion.info(), "alias": ref}


def resolve(cfg: config_mod.Config, dest: Path) -> tuple[Champion | None, dict]:
    """The champion to compare against (downloaded under `dest`), or (None, why there is none to compare):
    comparison switched off, no tracking server to ask, or no version with the alias."""
    import os

    if not cfg.eval.compare_champion:
        return None, {"available": False, "reason": "eval.compare_champion is false"}
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None, {"available": False, "reason": "no tracking server configured (tracking.tracking_uri or "
                      "MLFLOW_TRACKING_URI)"}
    mlflow.set_tracking_uri(uri)
    return fetch(cfg.tracking.registered_model, dest)
