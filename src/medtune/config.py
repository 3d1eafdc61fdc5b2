"""One typed config for local and cluster runs, loaded from a YAML profile plus `--set` overrides.

Every model forbids unknown keys, so a typo fails at load time with the field's dotted name instead of
being silently ignored halfway through a training run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CANONICAL_COLUMNS = ("id", "question", "answer", "focus", "qtype", "source")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Strict):
    path: str = Field(description="File, folder, or MedQuAD folder/archive with the QA pairs.")
    format: Literal["auto", "jsonl", "csv", "parquet", "medquad"] = "auto"
    # source column -> canonical column, e.g. {input: question, output: answer}
    columns: dict[str, Literal["id", "question", "answer", "focus", "qtype", "source"]] = {}
    limit: int | None = Field(None, ge=1, description="Keep only the first N rows read (slices for quick runs).")
    min_question_chars: int = Field(8, ge=1)
    max_question_chars: int = Field(1_000, ge=1)
    min_answer_chars: int = Field(2, ge=1)
    max_answer_chars: int = Field(20_000, ge=1)
    min_kept_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Stop the run when fewer rows survive.")


class PreprocessConfig(Strict):
    system_prompt: str = (
        "You are a careful medical information assistant. Answer concisely with general health "
        "information; you do not diagnose."
    )
    max_tokens: int = Field(384, ge=16, description="Rows whose rendered prompt+answer exceed this are dropped.")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    seed: int = 42


class ModelConfig(Strict):
    id: str = Field(description="Hub id (or a local directory when source=path); recorded as the base model.")
    source: Literal["hub", "path", "pypi_gguf"] = "hub"
    revision: str = "main"
    # source=pypi_gguf: a PyPI wheel that carries a GGUF file, converted once to safetensors in the cache.
    gguf_package: str | None = None
    gguf_file: str | None = None
    cache_dir: str = "~/.cache/medtune/models"

    @model_validator(mode="after")
    def _gguf_fields(self) -> ModelConfig:
        if self.source == "pypi_gguf" and not (self.gguf_package and self.gguf_file):
            raise ValueError("source=pypi_gguf needs gguf_package and gguf_file")
        return self


class LoraSettings(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = "all-linear"


class QuantSettings(Strict):
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class TrainConfig(Strict):
    method: Literal["lora", "qlora"] = "lora"
    lora: LoraSettings = LoraSettings()
    quantization: QuantSettings = QuantSettings()
    dtype: Literal["bfloat16", "float16", "float32"] = "float32"
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1 trains for `epochs`; a positive value caps the steps.")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    gradient_checkpointing: bool = False
    logging_steps: int = Field(5, ge=1)
    seed: int = 42


class EvalConfig(Strict):
    max_rows: int | None = Field(64, ge=1, description="Cap on test rows scored (generation is the slow part).")
    batch_size: int = Field(16, ge=1)
    max_new_tokens: int = Field(96, ge=1)


class GateRule(Strict):
    metric: Literal["exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL"]
    min: float | None = Field(None, description="Floor for the candidate's value.")
    min_improvement: float | None = Field(None, description="Candidate minus base must be at least this.")

    @model_validator(mode="after")
    def _has_bound(self) -> GateRule:
        if self.min is None and self.min_improvement is None:
            raise ValueError(f"gate rule for {self.metric} needs min or min_improvement")
        return self


class GateConfig(Strict):
    rules: list[GateRule] = Field(min_length=1)


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(None, description="MLflow server; `medtune run` starts a local one when unset.")
    experiment: str = "medtune"
    registered_model: str = "medtune-medqa"


class HubConfig(Strict):
    repo_id: str | None = None
    private: bool = True
    token_env: str = Field("HF_TOKEN", description="Name of the env var holding the token; never the token.")


class ClusterConfig(Strict):
    gpu_limit: int = Field(1, ge=0)
    gpu_node_selector: dict[str, str] = {"nvidia.com/gpu.present": "true"}
    gpu_toleration_key: str = "nvidia.com/gpu"


class Config(Strict):
    name: str
    data: DataConfig
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig
    tracking: TrackingConfig = TrackingConfig()
    hub: HubConfig = HubConfig()
    cluster: ClusterConfig = ClusterConfig()

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the file and the field."""


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
    node[leaf] = value


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set expects key=value, got '{item}'")
    # YAML parsing gives `--set train.lora.r=32` an int and `--set eval.max_rows=null` a None.
    return key.strip(), yaml.safe_load(raw) if raw else ""


def from_dict(tree: dict[str, Any], origin: str = "<config>") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{origin}: invalid config: {problems}") from None


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        _set_dotted(tree, *parse_override(item))
    return from_dict(tree, origin=str(path))


def from_json(text: str) -> Config:
    return from_dict(json.loads(text), origin="<pipeline parameter>")
