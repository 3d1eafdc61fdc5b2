"""One typed config for local and cluster runs, loaded from a YAML profile plus `--set` overrides.

Every model forbids unknown keys, so a typo fails at load time with the field's dotted name instead of
being silently ignored halfway through a training run.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medtune.images import CPU_IMAGE, GPU_IMAGE, IMAGE_REF

from medtune import metric_catalog

# `rejected`: preference data only (prompt -> question, chosen -> answer, rejected; see medtune.preference).
CANONICAL_COLUMNS = ("id", "question", "answer", "context", "focus", "qtype", "source", "choices", "rejected")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PhiAction = Literal["block", "mask", "off"]
CanonicalColumn = Literal["id", "question", "answer", "context", "focus", "qtype", "source", "choices", "rejected"]
SetKind = Literal["free_text", "closed_form"]
# Question and answer bounds per kind: exam vignettes run to thousands of characters, and a closed-form
# answer may be a single letter.
KIND_BOUNDS = {"free_text": {"max_question_chars": 1_000, "min_answer_chars": 2},
               "closed_form": {"max_question_chars": 8_000, "min_answer_chars": 1}}


class PhiConfig(Strict):
    """What to do with each kind of personal data found in question, answer or context.

    block: the row goes to quarantine; mask: the match is replaced by a placeholder and counted;
    off: not scanned. Public QA sources quote organisations' phone numbers and e-mail addresses, so
    those kinds are often set to mask rather than block.
    """

    email: PhiAction = "block"
    phone: PhiAction = "block"
    ssn: PhiAction = "block"
    mrn: PhiAction = "block"
    dob: PhiAction = "block"


class DataConfig(Strict):
    path: str = Field(description="File, folder, MedQuAD folder/archive, save_to_disk folder, or hf://owner/name.")
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet", "medquad", "hf"] = "auto"
    kind: SetKind = Field(
        "free_text", description="free_text: scored by overlap (F1, ROUGE, BLEU); closed_form: a label among "
        "choices (yes/no/maybe, option letters), scored by accuracy and macro-F1 (see eval.closed_form).")
    # source column -> canonical column, e.g. {input: question, output: answer}
    columns: dict[str, CanonicalColumn] = {}
    hf_split: str = Field("train", description="Split to read from a Hugging Face dataset.")
    hf_revision: str | None = Field(None, description="Hub revision (tag, branch or commit) to pin.")
    hf_config: str | None = Field(None, description="Hub dataset configuration (subset) name.")
    limit: int | None = Field(None, ge=1, description="Keep only the first N rows read (slices for quick runs).")
    min_question_chars: int = Field(8, ge=1)
    max_question_chars: int = Field(None, ge=1, description="Default by kind (KIND_BOUNDS).")
    min_answer_chars: int = Field(None, ge=1, description="Default by kind (KIND_BOUNDS).")
    # Generous on purpose: real answers reach ~30k characters (MedQuAD); the token budget trims for training.
    max_answer_chars: int = Field(50_000, ge=1)
    max_question_tokens: int | None = Field(None, ge=1, description="Token bound (base model's tokenizer).")
    max_answer_tokens: int | None = Field(None, ge=1, description="Token bound (base model's tokenizer).")
    allowed_values: dict[Literal["qtype", "source", "focus"], list[str]] = Field(
        {}, description="Categorical fields and the values they may take; other values are quarantined.")
    phi: PhiConfig = PhiConfig()
    max_bad_line_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="A file with more undecodable lines than this stops the run.")
    min_kept_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Stop the run when fewer rows survive.")
    max_file_bytes: int = Field(1 << 30, ge=1, description="Largest file or archive member read (decompressed); "
                                "a larger one stops the run instead of filling the disk or memory.")
    max_archive_members: int = Field(100_000, ge=1, description="Most members a .tar/.zip may hold.")
    max_row_bytes: int = Field(1 << 20, ge=1, description="Longest JSONL line or CSV field; a longer line is "
                               "quarantined (row_too_large) unread, a longer CSV field stops the run.")
    log_raw_quarantine: bool = Field(False, description="Also log the unmasked quarantine to MLflow; it holds "
                                     "the personal data the masked one hides.")

    @model_validator(mode="before")
    @classmethod
    def _kind_bounds(cls, tree):
        if isinstance(tree, dict):
            defaults = KIND_BOUNDS.get(tree.get("kind", "free_text"), {})
            tree = {**tree, **{k: v for k, v in defaults.items() if tree.get(k) is None}}
        return tree

    @model_validator(mode="after")
    def _bounds(self) -> DataConfig:
        for name in ("question", "answer"):
            low, high = getattr(self, f"min_{name}_chars"), getattr(self, f"max_{name}_chars")
            if low > high:
                raise ValueError(f"min_{name}_chars={low} is above max_{name}_chars={high}")
        return self


class PreprocessConfig(Strict):
    system_prompt: str = (
        "You are a careful medical information assistant. Answer concisely with general health "
        "information; you do not diagnose."
    )
    max_tokens: int = Field(384, ge=16, description="Rows whose rendered prompt+answer exceed this are dropped.")
    # drop: one row per normalised question (the first in source order); keep: every distinct answer stays.
    conflicting_duplicates: Literal["drop", "keep"] = "drop"
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
    r: int = Field(16, ge=1, description="Rank: capacity of the update; 8-32 is the usual range for small models.")
    alpha: int = Field(32, ge=1, description="Scale = alpha / r; keeping alpha = 2r keeps the step size stable.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field(
        "all-linear", description="Attention and MLP projections; fewer modules train faster and learn less.")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): magnitude + direction, slower steps.")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r) instead of alpha/r.")


class QuantSettings(Strict):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="NF4 fits normally distributed weights better.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too: ~0.4 bits/param saved.")
    # auto: bfloat16 on GPUs that have it, and on CPUs with native bf16 (AVX512-BF16/AMX); float32 elsewhere.
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"


class EarlyStopping(Strict):
    """Stop after `patience` validations without an improvement larger than `threshold`, then restore the best
    checkpoint (transformers' EarlyStoppingCallback with load_best_model_at_end): what is saved is the best
    model seen, not the last. Checkpoints are then written at every validation."""

    patience: int = Field(ge=1, description="Validations without improvement before stopping.")
    threshold: float = Field(0.0, ge=0.0, description="An improvement must exceed this to reset the patience.")


# Methods whose result is an adapter of the base model; the others (full, feature) save a whole model.
ADAPTER_METHODS = ("lora", "qlora")


class TrainConfig(Strict):
    # feature: the backbone frozen, only the top `feature_layers` decoder blocks and/or the LM head train.
    method: Literal["lora", "qlora", "full", "feature"] = "lora"
    lora: LoraSettings = LoraSettings()
    quantization: QuantSettings = QuantSettings()
    freeze_layers: int = Field(0, ge=0, description="method=full: freeze the embeddings and the first N decoder "
                                                    "layers.")
    feature_layers: int = Field(2, ge=0, description="method=feature: how many of the top decoder blocks train.")
    feature_head: bool = Field(True, description="method=feature: train the LM head (untied from the embeddings "
                                                 "when they share weights, so the input side stays frozen).")
    # auto: bfloat16 weights where matmuls are fast in bf16 (recent GPUs, CPUs with AVX512-BF16/AMX), else float32.
    # On a CPU without native bf16 a bf16 matmul is several times slower than float32.
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1 trains for `epochs`; a positive value caps the steps.")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold.")
    gradient_checkpointing: bool = Field(False, description="Saves activation memory at ~30% more compute.")
    padding_free: bool | Literal["auto"] = Field(
        True, description="Concatenate each batch into one row (no pad tokens computed); false: padded batches of "
                          "similar lengths; auto: padded on CPU, padding-free on CUDA or with packing "
                          "(benchmarks/train_throughput.py --ablations measures which is faster).")
    packing: bool = Field(False, description="TRL best-fit packing into preprocess.max_tokens rows; batch_size "
                                             "then counts packed rows.")
    completion_only_loss: bool = Field(True, description="Loss on the answer tokens only (prompt masked).")
    logging_steps: int = Field(5, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Validate every N steps; None: once per epoch.")
    early_stopping: EarlyStopping | None = Field(
        None, description="By validation loss, restoring the best checkpoint at the end; None: train to the end.")
    checkpoint_steps: int = Field(50, ge=0, description="Save a resumable checkpoint every N steps; 0: never.")
    checkpoint_dir: str | None = Field(
        None, description="Root for checkpoints (a PVC on the cluster); None: the step's work dir (no resume).")
    keep_checkpoints: int = Field(2, ge=1)
    divergence_factor: float = Field(
        4.0, gt=1.0, description="Stop as a learning-rate explosion when the loss exceeds this multiple of its "
                                 "lowest value so far.")
    export_merged: bool = Field(False, description="Also save the adapter folded into the base weights.")
    merge_tolerance: float = Field(1e-3, gt=0, description="Max |logit| difference merged vs base+adapter.")
    peak_tflops: float | None = Field(None, gt=0, description="Device peak for MFU; None: the dense bf16 table for "
                                                              "GPUs (a GPU not in it: no MFU), a matmul probe at the "
                                                              "model's shapes on CPU.")
    seed: int = 42

    @model_validator(mode="after")
    def _method_fields(self) -> TrainConfig:
        if self.freeze_layers and self.method != "full":
            raise ValueError("train.freeze_layers applies to method=full only")
        if self.method == "feature" and not (self.feature_layers or self.feature_head):
            raise ValueError("method=feature trains nothing: set train.feature_layers > 0 or train.feature_head")
        if self.packing and self.padding_free is False:
            raise ValueError("train.packing needs train.padding_free=true (TRL packs into padding-free rows)")
        return self


GateMetric = Literal[tuple(metric_catalog.METRICS)]


class GateRule(Strict):
    """Bounds on one metric of the candidate. Every bound that is set is one check in the decision.

    Improvement and regression follow the metric's direction (metric_catalog): for lower-is-better metrics
    (perplexity, empty_rate, ...) an improvement is a decrease.
    """

    metric: GateMetric
    suite: str | None = Field(None, description="The eval suite the rule reads; None: the run's own test split. "
                              "Rules listed under a suite get its name.")
    min: float | None = Field(None, description="Floor for the candidate's value.")
    max: float | None = Field(None, description="Ceiling for the candidate's value (quality checks).")
    min_improvement: float | None = Field(
        None, ge=0.0, description="Improvement over the base model must be at least this (never negative: a "
        "negative one would let a worse model pass).")
    significant: bool = Field(False, description="The improvement over base must have a CI that excludes zero.")
    max_regression: float | None = Field(
        None, ge=0.0, description="The candidate may be worse than the champion by at most this (skipped when "
        "no champion is registered).")
    non_inferior: float | None = Field(
        None, ge=0.0, description="Non-inferiority margin: the CI bound of candidate - base on the worse side "
        "must stay above -margin (and of candidate - champion, when one is registered).")

    @model_validator(mode="after")
    def _has_bound(self) -> GateRule:
        comparative = (self.min_improvement, self.max_regression, self.non_inferior)
        if all(v is None for v in (self.min, self.max, *comparative)) and not self.significant:
            raise ValueError(f"gate rule for {self.metric} needs min, max, min_improvement, max_regression, "
                             "non_inferior or significant")
        if metric_catalog.sign(self.metric) == 0 and (any(v is not None for v in comparative) or self.significant):
            raise ValueError(f"{self.metric} has no better direction: use min/max for it")
        return self


class SuiteConfig(Strict):
    """An evaluation set beside the run's own split, scored for base, candidate and champion."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,40}$")
    path: str = Field(description="JSONL/CSV/Parquet file; a relative path resolves against the working "
                      "directory, then the medtune checkout (suites shipped in data/suites).")
    kind: SetKind
    # source column -> canonical column (question, answer, choices, id, ...), as data.columns
    columns: dict[str, CanonicalColumn] = {}
    max_rows: int | None = Field(None, ge=1, description="Score only the first N questions.")
    few_shot_path: str | None = Field(None, description="Closed form: examples (same columns) shown before "
                                      "each question.")
    few_shot_k: int = Field(0, ge=0, description="How many few-shot examples; 0: zero-shot.")
    rules: list[GateRule] = []

    @model_validator(mode="after")
    def _fields(self) -> SuiteConfig:
        if self.few_shot_k and not self.few_shot_path:
            raise ValueError(f"suite {self.name}: few_shot_k needs few_shot_path")
        for rule in self.rules:
            if rule.suite not in (None, self.name):
                raise ValueError(f"suite {self.name}: a rule under it names suite {rule.suite}")
            _fits_kind(rule, self.kind, f"suite {self.name}")
        return self


def _fits_kind(rule: GateRule, kind: str, where: str) -> None:
    metric_kind = metric_catalog.METRICS[rule.metric].kind
    if metric_kind not in (kind, "quality"):
        raise ValueError(f"{where} is {kind}, but its rule names the {metric_kind} metric {rule.metric}")


class EvalConfig(Strict):
    max_rows: int | None = Field(64, ge=1, description="Cap on test rows scored (generation is the slow part).")
    batch_size: int = Field(128, ge=1, description="Prompts generated together. Decoding a small model reads "
                            "every weight once per step for the whole batch, so larger batches answer faster until "
                            "compute binds (SmolLM2 on 2 CPU cores: 50 K-QA answers in 35-40 s at 50, 56-69 s at 16; "
                            "all 100 in 67.5 s at 100, 92.0 s at 64; the same answers each time). Choice "
                            "likelihoods use at most 16 (see evaluate.LIKELIHOOD_BATCH).")
    max_new_tokens: int = Field(96, ge=1)
    closed_form: Literal["likelihood", "generate"] = Field(
        "likelihood", description="likelihood: the choice with the highest log-likelihood as the answer's "
        "continuation (never unparseable, one forward pass per choice); generate: generate an answer and "
        "parse a label from it (reports unparseable_rate).")
    compare_champion: bool = Field(True, description="Also score the registered `champion` version, if any.")
    reuse_outputs: bool = Field(True, description="Take a model's answers and likelihoods from an earlier run "
                                "when its weights, prompts, settings, code and library versions are the same "
                                "(medtune.reuse; the base model's and champion's scores are then not recomputed "
                                "every run). Off: every output is computed afresh.")
    bootstrap_samples: int = Field(1000, ge=100, description="Paired bootstrap resamples per metric.")
    confidence: float = Field(0.95, ge=0.9, lt=1.0, description="Two-sided confidence level of the CIs (a floor "
                              "of 0.9: a lower level lets noise pass as significant).")
    seed: int = Field(0, description="Seed of the bootstrap resamples (same seed, same intervals).")
    repetition_ngram: int = Field(3, ge=1, description="n of the word n-grams checked for repetition.")
    repetition_threshold: float = Field(
        0.25, gt=0.0, le=1.0, description="An answer whose repeated n-gram share reaches this is degenerate.")
    length_change_flag: float = Field(
        0.3, gt=0.0, description="The report flags a candidate whose mean answer length differs from the base "
        "model's by more than this fraction on any free-text set.")
    suites: list[SuiteConfig] = []

    @model_validator(mode="after")
    def _unique_suites(self) -> EvalConfig:
        names = [s.name for s in self.suites]
        if len(set(names)) != len(names) or {"test", "predictions"} & set(names):
            raise ValueError(f"eval.suites names must be unique and not 'test' (the own split) or 'predictions' "
                             f"(its answers file): {names}")
        return self


class DecodingConfig(Strict):
    """How answers are decoded: part of the recipe. Evaluate answers with it for base and candidate alike (they
    differ in their weights only), and what passed the gate is served with it (`medtune serve`, the registered
    pyfunc, `medtune ask`). Greedy; these settings push it away from loops. Both look at the answer's own
    tokens, not the prompt's (medtune.decoding), which vLLM cannot do: a version gated with either is served by
    the transformers engine."""

    repetition_penalty: float = Field(
        1.0, ge=1.0, le=2.0, description="Divides the logit of every token the answer already holds (CTRL's "
        "penalty; 1.0 is off). Also penalises the terms an answer must repeat; 1.1-1.3 is the usual range.")
    no_repeat_ngram_size: int = Field(
        0, ge=0, description="Never repeat a token n-gram of this size within an answer (0 is off). Small values "
        "(2) also forbid legitimate repeats of a multi-token term; 3-4 break loops only.")

    @property
    def plain(self) -> bool:
        """Greedy or sampled decoding with nothing added: what any engine reproduces."""
        return self.repetition_penalty == 1.0 and not self.no_repeat_ngram_size


class PreferenceConfig(Strict):
    """Direct preference optimisation (TRL's DPOTrainer) after SFT, continuing the SFT result.

    The reference policy is the SFT model, so `beta` bounds how far preference tuning may move away from it.
    Pairs come from `data` (prompt/chosen/rejected, validated like any data) or, when it is None, from the SFT
    training split: chosen = the reference answer, rejected = the SFT model's own greedy answer (self-play).
    """

    enabled: bool = Field(False, description="False: the preference step passes the SFT result on unchanged.")
    data: DataConfig | None = Field(None, description="Preference dataset; None: self-play pairs from the SFT data.")
    beta: float = Field(0.1, gt=0.0, description="Strength of the pull back to the SFT policy (IPO: tau).")
    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    sft_weight: float = Field(0.0, ge=0.0, description="Weight of an added NLL loss on the chosen answer; keeps "
                                                       "its likelihood from falling while the margin grows.")
    learning_rate: float = Field(2e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="-1 trains for `epochs`; a positive value caps the steps.")
    batch_size: int = Field(4, ge=1, description="Pairs per step (each pair is two sequences).")
    grad_accum: int = Field(1, ge=1)
    max_length: int = Field(512, ge=16, description="Prompt + answer tokens; longer pairs are cut at the end.")
    max_pairs: int | None = Field(None, ge=1, description="Self-play: cap on the questions answered per split "
                                                          "(the generation is the slow part).")
    max_new_tokens: int | None = Field(None, ge=1, description="Self-play answer length; None: eval.max_new_tokens.")
    near_identical: float = Field(0.9, gt=0.0, le=1.0, description="Self-play pairs whose answers reach this token "
                                                                  "F1 are dropped (no preference to learn).")
    logging_steps: int = Field(2, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="Validate every N steps; None: once per epoch.")
    early_stopping: EarlyStopping | None = Field(
        None, description="By held-out reward margin, restoring the best checkpoint at the end.")
    seed: int = 42


class GateConfig(Strict):
    """The promotion policy, versioned with the run as part of the profile."""

    rules: list[GateRule] = Field(min_length=1)
    min_questions: int = Field(30, ge=1, description="A set with fewer scored questions fails its rules: a "
                               "handful of questions gives intervals too wide to mean anything.")
    promote: bool = Field(False, description="On a pass, move the `champion` alias to the new version too "
                          "(otherwise it only becomes `challenger`).")


def _no_credentials(uri: str | None) -> str | None:
    """The config is logged (MLflow params, lineage.json): a URI in it must not carry a password."""
    from medtune.uris import redact

    if uri and redact(uri) != uri:
        raise ValueError("credentials in the URI would be logged with the config; give the bare URL and the "
                         "credentials in $MLFLOW_TRACKING_USERNAME/$MLFLOW_TRACKING_PASSWORD (MLflow) or the token "
                         "Secret (Hub)")
    return uri


class TrackingConfig(Strict):
    tracking_uri: str | None = Field(None, description="MLflow server; `medtune run` starts a local one when unset.")
    experiment: str = "medtune"
    registered_model: str = "medtune-medqa"

    _bare_uri = field_validator("tracking_uri")(_no_credentials)


class HubConfig(Strict):
    repo_id: str | None = None
    private: bool = True
    token_env: str = Field("HF_TOKEN", description="Name of the env var holding the token; never the token.")
    endpoint: str | None = Field(None, description="Hub URL (a private Hub or mirror); None: huggingface.co.")
    license: str = "apache-2.0"

    _bare_uri = field_validator("endpoint")(_no_credentials)


class ServeConfig(Strict):
    """`medtune serve`: bounds on what one request may ask and how concurrent requests are batched."""

    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto", description="auto: vLLM where it is installed and CUDA is present, transformers elsewhere.")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    system_prompt: str | None = Field(None, description="None: preprocess.system_prompt (what the model was "
                                                        "trained with), followed by `disclaimer`.")
    disclaimer: str = Field(
        "This is general health information, not medical advice; consult a qualified clinician about your "
        "own situation.", min_length=1)
    default_max_tokens: int = Field(128, ge=1)
    max_tokens_limit: int = Field(512, ge=1, description="A request asking for more gets a 400.")
    max_prompt_tokens: int = Field(1024, ge=16, description="A longer rendered prompt gets a 400.")
    default_temperature: float = Field(0.0, ge=0.0, description="0 is greedy (what the gate evaluated).")
    max_temperature: float = Field(2.0, ge=0.0)
    max_stop: int = Field(4, ge=0, le=16, description="Most stop strings one request may give.")
    max_batch_size: int = Field(8, ge=1)
    threads: int | None = Field(None, ge=1, description="torch threads for generation; None: torch's default "
                                "(one per core). On a CPU shared with other busy jobs 1 can be ~10x faster: each "
                                "matmul otherwise waits for a descheduled sibling thread.")
    batch_window_ms: float = Field(10.0, ge=0.0, description="How long the first request of a batch waits for "
                                                             "company.")
    max_queue: int = Field(256, ge=1, description="Queued requests beyond this get a 429.")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="A larger request body gets a 413.")
    drain_timeout_s: float = Field(60.0, gt=0, description="On SIGTERM, how long in-flight requests may finish.")

    @model_validator(mode="after")
    def _bounds(self) -> ServeConfig:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens={self.default_max_tokens} is above "
                             f"max_tokens_limit={self.max_tokens_limit}")
        if self.default_temperature > self.max_temperature:
            raise ValueError(f"default_temperature={self.default_temperature} is above "
                             f"max_temperature={self.max_temperature}")
        return self

TaskName = Literal["open_run", "validate_data", "preprocess", "train", "evaluate", "gate", "register", "push",
                   "audit"]
# repository[:port/path]:tag[@sha256:digest]; a tag is required and `latest` is refused (not a pin).
IMAGE_REF = r"^[a-z0-9][a-z0-9._/:-]*?:([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})(@sha256:[0-9a-f]{64})?$"


def _default_image(kind: str) -> str:
    from medtune import images

    return images.CPU_IMAGE if kind == "cpu" else images.GPU_IMAGE


class Resources(Strict):
    cpu: str = Field(pattern=r"^\d+(\.\d+)?m?$", description="Kubernetes CPU quantity (request = limit).")
    memory: str = Field(pattern=r"^\d+(Ki|Mi|Gi|Ti)$", description="Kubernetes memory quantity (request = limit).")


class RetryPolicy(Strict):
    retries: int = Field(ge=0, le=10)
    backoff_s: int = Field(30, ge=0, description="Wait before the first retry; multiplied by backoff_factor after.")
    backoff_factor: float = Field(2.0, ge=1.0)
    backoff_max_s: int = Field(900, ge=1)


class ClusterConfig(Strict):
    """How the compiled pipeline runs on Kubernetes. kfp.local ignores all but the retry policies."""

    cpu_image: str = Field(CPU_IMAGE, pattern=IMAGE_REF)
    cuda_image: str = Field(GPU_IMAGE, pattern=IMAGE_REF)
    gpu_limit: int = Field(1, ge=0, description="GPUs per GPU task; 0 runs every task on the CPU image and pool.")
    gpu_resource: str = "nvidia.com/gpu"
    gpu_node_selector: dict[str, str] = {"nvidia.com/gpu.present": "true"}
    gpu_toleration_key: str = "nvidia.com/gpu"
    gpu_resources: Resources = Resources(cpu="8", memory="48Gi")
    cpu_resources: Resources = Resources(cpu="2", memory="8Gi")
    cpu_node_selector: dict[str, str] = Field({}, description="Optional pool for the CPU tasks.")
    model_cache_pvc: str = Field("medtune-model-cache", description="Mounted at model.cache_dir on model tasks.")
    data_pvc: str | None = Field("medtune-data", description="Mounted at data_mount on validate_data; None for "
                                 "hf:// data or data baked into the image.")
    data_mount: str = "/data"
    # Secret names only; the keys are fixed: <hf_secret>.token and <hf_read_secret>.token are mounted as the
    # file $HF_TOKEN_PATH (push only for the write token; the Hub downloads for the read one),
    # <mlflow_secret>.username/.password -> $MLFLOW_TRACKING_USERNAME/$MLFLOW_TRACKING_PASSWORD.
    hf_secret: str | None = "medtune-hf"
    hf_read_secret: str | None = Field("medtune-hf-read", description="Optional read-only Hub token for gated "
                                       "or private downloads; never the write token.")
    mlflow_secret: str | None = "medtune-mlflow"
    # Per task, overriding the step's default (its StepSpec in medtune/steps/<task>.py); `medtune config show`
    # prints the defaults. retries: {train: {retries: 2}}; retries 0 switches a default policy off.
    retries: dict[str, RetryPolicy] = {}
    timeouts_s: dict[str, int] = {}
    pipeline_name: str = "medtune"
    experiment: str = "medtune"
    namespace: str | None = Field(None, description="Profile namespace on multi-user Kubeflow; None standalone.")
    service_account: str | None = "medtune-pipeline-runner"

    @field_validator("retries", "timeouts_s")
    @classmethod
    def _known_tasks(cls, value: dict) -> dict:
        if value:
            from medtune.steps import STEP_MODULES

            unknown = sorted(set(value) - set(STEP_MODULES))
            if unknown:
                raise ValueError(f"unknown task {', '.join(unknown)}; tasks: {', '.join(STEP_MODULES)}")
        return value

    def retry_policy(self, spec) -> RetryPolicy | None:
        """The task's retry policy: this section's override, else the step's default (a StepSpec)."""
        return self.retries.get(spec.name, spec.retry)

    def timeout(self, spec) -> int:
        """The task's timeout in seconds: this section's override, else the step's default (a StepSpec)."""
        return self.timeouts_s.get(spec.name, spec.timeout_s)

    @model_validator(mode="after")
    def _pinned_images(self) -> ClusterConfig:
        for field in ("cpu_image", "cuda_image"):
            ref = getattr(self, field)
            if re.match(IMAGE_REF, ref).group(1) == "latest":
                raise ValueError(f"{field}={ref}: `latest` is not a pin; use the version tag (and digest)")
        return self


# A runtime image must name its content: repository[:tag]@sha256:<digest>.
DIGEST_REF = r"^[a-z0-9][a-z0-9._/:-]*@sha256:[0-9a-f]{64}$"


class DeployResources(Resources):
    gpu: int = Field(1, ge=0, description="GPUs per replica (cluster.gpu_resource); 0 serves on CPU.")


class DeployConfig(Strict):
    """The `deploy` step: a KServe InferenceService (RawDeployment) serving the registered adapter."""

    enabled: bool = Field(False, description="False: the step records that it skipped, and why.")
    namespace: str = Field("medtune", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    name: str = Field("medtune", pattern=r"^[a-z]([-a-z0-9]{0,40}[a-z0-9])?$",
                      description="InferenceService of the champion; a challenger is `<name>-challenger`.")
    runtime_image: str | None = Field(None, pattern=DIGEST_REF, description="vLLM OpenAI server image, pinned by "
                                                                            "digest; required when enabled.")
    resources: DeployResources = DeployResources(cpu="4", memory="16Gi")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    scale_target: int = Field(80, ge=1, le=100, description="HPA target CPU utilisation (%) between the bounds.")
    max_model_len: int = Field(2048, ge=128)
    service_account: str = "medtune-deployer"
    # The run-time config does not carry `cluster:`; these two must match it (a Profile checks they do).
    model_cache_pvc: str = Field("medtune-model-cache", description="The PVC holding base models and staged "
                                 "adapters (cluster.model_cache_pvc), mounted by KServe at /mnt/models.")
    gpu_resource: str = Field("nvidia.com/gpu", description="Extended resource name of a GPU (cluster.gpu_resource).")
    ready_timeout_s: int = Field(900, ge=10)
    smoke_question: str = "What are common symptoms of iron deficiency anemia?"

    @model_validator(mode="after")
    def _consistent(self) -> DeployConfig:
        if self.enabled and not self.runtime_image:
            raise ValueError("deploy.enabled needs deploy.runtime_image (pinned by @sha256 digest)")
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} is above max_replicas={self.max_replicas}")
        return self


def _flatten_fields(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"lora": {"r": [8, 16]}} -> {"lora.r": [8, 16]}: `--set sweep.grid.lora.r=[8,16]` nests the key."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten_fields(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _number(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


class SweepConfig(Strict):
    """Hyperparameter sweep: one train task per trial (ParallelFor), the best by `metric` goes on to evaluate.

    Keys are `train.*` fields written below `train` (`learning_rate`, `lora.r`, `epochs`, ...)."""

    grid: dict[str, list[Any]] = Field(
        {}, description="Values per field; every combination is a trial. More trials: better odds, more GPU hours.")
    ranges: dict[str, tuple[int | float, int | float]] = Field(
        {}, description="[low, high] per field, sampled `trials` times per grid point (log-uniform for *rate "
                        "fields, integers when both bounds are).")
    trials: int = Field(0, ge=0, description="Random samples of `ranges` per grid point.")
    seed: int = 0
    metric: str = Field("eval_loss", description="The trial's training metric that selects the winner "
                                                 "(validation loss by default).")
    lower_is_better: bool = True
    parallelism: int = Field(1, ge=1, description="Trials training at once (compiled into the DAG): bounds GPU "
                                                  "use on the cluster; 1 locally, where trials share the CPU.")
    screen_fraction: float = Field(
        1.0, gt=0.0, le=1.0,
        description="Successive halving: every trial trains this fraction of its steps (on the full run's "
                    "schedule) and is validated there; only the winner then trains the rest, resuming from its "
                    "checkpoint, so it ends as it would have trained straight through. 1: every trial trains in "
                    "full. 0.5 with 3 trials trains 4 runs' halves instead of 6; a short screen favours trials "
                    "that learn fast over ones that end best.")

    @field_validator("grid", "ranges", mode="before")
    @classmethod
    def _dotted(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        # YAML reads 3e-3 (no dot) as a string; a sweep value is a number wherever it reads as one
        return {k: [_number(v) for v in vs] if isinstance(vs, list) else vs
                for k, vs in _flatten_fields(value).items()}

    @model_validator(mode="after")
    def _shape(self) -> SweepConfig:
        for key, values in self.grid.items():
            if not values:
                raise ValueError(f"sweep.grid.{key}: needs at least one value")
        for key, (low, high) in self.ranges.items():
            if not low < high or (key.endswith("rate") and low <= 0):
                raise ValueError(f"sweep.ranges.{key}: needs 0 < low < high for a rate, low < high otherwise")
        if bool(self.ranges) != bool(self.trials):
            raise ValueError("sweep.trials: set both sweep.ranges and sweep.trials (random samples), or neither")
        return self


class Config(Strict):
    """The run-time config: the compiled pipeline's `config` parameter, which a run may change field by field."""

    name: str
    data: DataConfig
    preprocess: PreprocessConfig = PreprocessConfig()
    model: ModelConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    decoding: DecodingConfig = DecodingConfig()
    gate: GateConfig
    tracking: TrackingConfig = TrackingConfig()
    hub: HubConfig = HubConfig()
    serve: ServeConfig = ServeConfig()
    deploy: DeployConfig = DeployConfig()
    sweep: SweepConfig = SweepConfig()
    preference: PreferenceConfig = PreferenceConfig()

    @model_validator(mode="after")
    def _trials_valid(self) -> Config:
        """Every trial's config must load now, not hours into the sweep."""
        from medtune import sweep

        tree = self.model_dump(mode="json", include={"train"})
        for index, trial in enumerate(sweep.expand(self.sweep)):
            try:
                TrainConfig.model_validate(sweep.apply(tree, trial)["train"])
            except (KeyError, TypeError):
                raise ValueError(f"sweep trial {index} ({sweep.label(trial)}): no such train field") from None
            except ValidationError as exc:
                problems = "; ".join(f"train.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"sweep trial {index} ({sweep.label(trial)}): {problems}") from None
        return self

    def trials(self) -> list[dict[str, Any]]:
        from medtune import sweep

        return sweep.expand(self.sweep) or [{}]

    @model_validator(mode="after")
    def _deploy_serves_the_decoding(self) -> Config:
        if self.deploy.enabled and not self.decoding.plain:
            raise ValueError(f"deploy.enabled with decoding {self.decoding.model_dump()}: KServe's vLLM runtime "
                             "cannot limit repetition to the answer's tokens as evaluate does, so it would serve "
                             "answers the gate never saw; serve with `medtune serve` instead")
        return self

    @model_validator(mode="after")
    def _rules_fit(self) -> Config:
        suites = {s.name: s.kind for s in self.eval.suites}
        for rule in self.gate.rules:
            if rule.suite is None:
                continue  # the own split's kind is often overridden (`medtune evaluate --set data.kind=...`)
            if rule.suite not in suites:
                raise ValueError(f"gate rule for {rule.metric} names suite {rule.suite}, which eval.suites lacks")
            _fits_kind(rule, suites[rule.suite], f"suite {rule.suite}")
        return self

    def policy_rules(self) -> list[GateRule]:
        """Every rule of the decision: gate.rules plus each suite's rules, tagged with the suite's name."""
        return [*self.gate.rules, *(r.model_copy(update={"suite": s.name}) for s in self.eval.suites
                                    for r in s.rules)]

    def policy(self) -> dict:
        """Everything that changes the gate's decision (its hash is the policy's identity)."""
        ev = self.eval
        return {"gate": self.gate.model_dump(mode="json"), "suites": [s.model_dump(mode="json") for s in ev.suites],
                "eval": {k: getattr(ev, k) for k in ("max_rows", "confidence", "bootstrap_samples", "seed",
                                                     "compare_champion", "closed_form")},
                "decoding": self.decoding.model_dump(mode="json"),
                "data_kind": self.data.kind}

    def policy_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.policy(), sort_keys=True).encode()).hexdigest()

    def to_json(self) -> str:
        """The run-time fields only (a Profile's `cluster:` is compiled in, never passed to a run)."""
        return json.dumps(self.model_dump(mode="json", include=set(Config.model_fields)), sort_keys=True)

    def digest(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


class Profile(Config):
    """A profile file (configs/*.yaml): the run-time config plus `cluster:`, which shapes the compiled YAML
    only (images, pools, resources, PVCs, Secrets, retries, timeouts) and is not part of what a run receives."""

    cluster: ClusterConfig = ClusterConfig()

    @model_validator(mode="after")
    def _deploy_matches_cluster(self) -> Profile:
        for field in ("model_cache_pvc", "gpu_resource"):
            if getattr(self.deploy, field) != getattr(self.cluster, field):
                raise ValueError(f"deploy.{field}={getattr(self.deploy, field)} differs from cluster.{field}="
                                 f"{getattr(self.cluster, field)}: the served model reads what the pipeline wrote")
        return self

    def runtime(self) -> Config:
        return Config.model_validate(self.model_dump(include=set(Config.model_fields)))


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


def from_dict(tree: dict[str, Any], origin: str = "<config>", model: type[Config] = Profile) -> Config:
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{origin}: invalid config: {problems}") from None


# The bundled profiles: `--config local` names configs/local.yaml from any working directory.
PROFILES = Path(__file__).resolve().parents[2] / "configs"


def find_profile(ref: str | Path) -> Path:
    """A profile by path (relative to the working directory) or by the name of a bundled one."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    for candidate in (PROFILES / path.name, PROFILES / f"{path.name}.yaml"):
        if candidate.is_file() and (path.parent == Path(".") or path.parent == Path("configs")):
            return candidate
    bundled = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
    raise ConfigError(f"{ref}: config file not found (nor a bundled profile: {bundled})")


def load(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Profile:
    path = find_profile(path)
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
    """The run-time config a step receives; in a task pod, refused if it redirects a pinned field."""
    from medtune import pins

    return pins.enforce(from_dict(json.loads(text), origin="<pipeline parameter>", model=Config))
