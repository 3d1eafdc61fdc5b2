"""Register gated weights as a new MLflow model version.

The trained weights (a LoRA adapter, or the whole model for train.method full) are logged as a pyfunc that
loads them on demand (`models.load_trained`), so `mlflow.pyfunc.load_model` answers questions; for an
adapter the base weights are not copied into the registry (they are referenced by id).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd

from medtune import tags, tracking
from medtune.config import Config


class AdapterQA(mlflow.pyfunc.PythonModel):
    """pyfunc: a DataFrame with a `question` column in, a list of answers out."""

    def load_context(self, context):
        from medtune import config as config_mod, models

        self.cfg = config_mod.from_json(Path(context.artifacts["config"]).read_text())
        self.tokenizer = models.load_tokenizer(self.cfg.model, padding_side="left")
        self.model = models.load_trained(self.cfg.model, self.cfg.train, context.artifacts["adapter"])

    def predict(self, context, model_input: pd.DataFrame, params=None):
        from medtune.evaluate import generate
        from medtune.preprocess import render_prompt

        prompts = [render_prompt(self.tokenizer, self.cfg.preprocess.system_prompt, q)
                   for q in model_input["question"]]
        return generate(self.model, self.tokenizer, prompts, batch_size=self.cfg.eval.batch_size,
                        max_new_tokens=self.cfg.eval.max_new_tokens, desc="answering",
                        decoding=self.cfg.decoding)


class GateNotPassed(RuntimeError):
    """register was asked to register a model whose gate decision did not pass."""


def register(cfg: Config, parent_run_id: str, adapter_dir: Path, decision: dict, workdir: Path) -> dict:
    # Whatever called it (the DAG's passing branch, a script, a retried task): no pass, no version.
    if decision.get("passed") is not True:
        raise GateNotPassed(f"refusing to register: the gate decision did not pass "
                            f"({str(decision.get('summary', 'no summary'))[:300]})")
    config_path = workdir / "config.json"
    config_path.write_text(cfg.to_json())
    ran = tracking.images_ran(parent_run_id)
    version_tags = {**tracking.identity(cfg), tags.GATE: "passed" if decision["passed"] else "failed",
                    tags.GATE_SUMMARY: decision["summary"], tags.RUN_ID: parent_run_id,
                    tags.DECODING: json.dumps(cfg.decoding.model_dump(), sort_keys=True),
                    **({tags.IMAGES: json.dumps(ran)} if ran else {})}
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=AdapterQA(),
        artifacts={"adapter": str(adapter_dir), "config": str(config_path)},
        registered_model_name=cfg.tracking.registered_model,
        pip_requirements=["medtune", "torch", "transformers", "peft"],
    )
    client = mlflow.MlflowClient()
    version = str(info.registered_model_version)
    for key, value in version_tags.items():
        client.set_model_version_tag(cfg.tracking.registered_model, version, key, value)
    return {"name": cfg.tracking.registered_model, "version": version, "model_uri": info.model_uri,
            **set_aliases(client, cfg.tracking.registered_model, version, decision)}


def set_aliases(client, name: str, version: str, decision: dict) -> dict:
    """A passed version becomes `challenger`; `champion` moves to it only when the decision says promote.

    Moving an alias never deletes a version: the previous champion stays registered (and is tagged on the
    new version, so the hand-over can be traced and undone by moving the alias back).
    """
    from medtune.champion import lookup

    if not decision.get("passed"):
        return {"alias": None, "aliases": [], "previous_champion": None, "promoted": False}
    previous = lookup(name)
    previous_version = previous["version"] if previous["available"] else None
    client.set_registered_model_alias(name, "challenger", version)
    aliases = ["challenger"]
    promoted = bool(decision.get("promote"))
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
        aliases.append("champion")
        if previous_version:
            client.set_model_version_tag(name, version, tags.PREVIOUS_CHAMPION, previous_version)
    client.set_model_version_tag(name, version, tags.PROMOTED, str(promoted).lower())
    return {"alias": aliases[-1], "aliases": aliases, "previous_champion": previous_version, "promoted": promoted}
