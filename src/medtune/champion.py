"""Find the current champion: the registered model version carrying the MLflow alias `champion`.

The registered model is a pyfunc (see `medtune.registry`) whose artifacts hold the trained weights (a LoRA
adapter, or a full model for train.method full); downloading them gives that directory. The champion is
scored on the profile's base model, never on one the registry names: whoever can write to the registry
(tags, the stored config) must not choose what a GPU pod holding the Hub token downloads and runs (a
`pypi_gguf` package is installed with pip). A champion tagged with another base model is not comparable
and is skipped with that reason; pickled weight files in its artifacts are refused (loading them runs
code), only safetensors weights are read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from medtune import config as config_mod
from medtune import tags

ALIAS = "champion"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt")


class UnsafeChampion(ValueError):
    """The champion's artifacts hold what medtune will not load."""


@dataclass
class Champion:
    name: str
    version: str
    run_id: str | None
    adapter_dir: Path  # its trained weights: an adapter of the profile's base model, or a full model
    # how its answers were decoded when it passed the gate (its medtune.decoding tag), and so how it is served
    # and scored; a version from before the tag was plain greedy, which is what the default means
    decoding: config_mod.DecodingConfig = field(default_factory=config_mod.DecodingConfig)

    def info(self) -> dict:
        return {"available": True, "name": self.name, "version": self.version, "run_id": self.run_id,
                "alias": ALIAS, "reason": ""}


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
            "run_id": version.run_id or version.tags.get(tags.RUN_ID), "alias": ref, "reason": "",
            "base_model": version.tags.get(tags.BASE_MODEL),
            "base_model_revision": version.tags.get(tags.BASE_MODEL_REVISION),
            "decoding": version.tags.get(tags.DECODING)}


def other_base(info: dict, base: config_mod.ModelConfig) -> str | None:
    """Why the champion cannot be scored on the profile's base model; None when it can. A version without
    the tags predates them; medtune only ever registered adapters of the profile's base, so it is scored."""
    trained_on, revision = info.get("base_model"), info.get("base_model_revision")
    if trained_on is None or (trained_on == base.id and revision in (None, base.revision)):
        return None
    return (f"champion {info['name']} version {info['version']} was trained on {trained_on}@{revision}, "
            f"not on this profile's base model {base.id}@{base.revision}: not comparable (the base model comes "
            "from the profile, never from the registry)")


def fetch(registered_model: str, dest: Path, base: config_mod.ModelConfig, ref: str = ALIAS
          ) -> tuple[Champion | None, dict]:
    """Download the weights of the version `ref` names (alias or number, default the champion) under `dest`;
    (None, why) when there is no such version on the profile's base."""
    info = lookup(registered_model, ref)
    if not info["available"]:
        return None, info
    reason = other_base(info, base)
    if reason:
        return None, {**info, "available": False, "reason": reason}
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{registered_model}/{info['version']}", dst_path=str(dest)))
    # The trained weights, in safetensors: an adapter (lora/qlora), else a full model (train.method full).
    weights = sorted(p.parent for p in local.rglob("adapter_config.json")
                     if (p.parent / "adapter_model.safetensors").exists()) or \
        sorted(p.parent for p in local.rglob("config.json")
               if "architectures" in json.loads(p.read_text()) and any(p.parent.glob("*.safetensors")))
    if not weights:
        raise FileNotFoundError(f"{registered_model} version {info['version']}: no adapter or model weights in "
                                f"safetensors in its artifacts ({local})")
    # peft and transformers would unpickle a .bin next to the weights they load (MLflow's own
    # python_model.pkl elsewhere in the artifacts is never loaded here).
    pickled = sorted(str(p.relative_to(local)) for pattern in PICKLED for p in weights[0].rglob(pattern))
    if pickled:
        raise UnsafeChampion(f"{registered_model} version {info['version']}: pickled files in its weights "
                             f"({', '.join(pickled)}); loading them would run code, so the champion is refused")
    champion = Champion(name=registered_model, version=info["version"], run_id=info["run_id"],
                        adapter_dir=weights[0],
                        decoding=config_mod.DecodingConfig.model_validate_json(info.get("decoding") or "{}"))
    return champion, {**info, **champion.info(), "alias": ref}


def resolve(cfg: config_mod.Config, dest: Path) -> tuple[Champion | None, dict]:
    """The champion to compare against (downloaded under `dest`), or (None, why there is none to compare):
    comparison switched off, no tracking server to ask, or no version with the alias on the profile's base."""
    import os

    if not cfg.eval.compare_champion:
        return None, {"available": False, "reason": "eval.compare_champion is false"}
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return None, {"available": False, "reason": "no tracking server configured (tracking.tracking_uri or "
                      "MLFLOW_TRACKING_URI)"}
    mlflow.set_tracking_uri(uri)
    return fetch(cfg.tracking.registered_model, dest, cfg.model)
