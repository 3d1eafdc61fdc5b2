"""Preference tuning (DPO) after SFT: pairs, TRL's DPOTrainer continuing the SFT result, held-out scores.

The SFT adapter is loaded trainable and handed to DPOTrainer without a `peft_config`, so the reference policy is
the SFT model (TRL copies the adapter as a frozen `ref` adapter; its log-probabilities are computed once, before
training, and the copy is then removed so that exactly one adapter is trained, checkpointed and saved). A whole
SFT model (train.method full or feature) is continued with the same freezing, its reference log-probabilities
computed by the policy itself before the first step.

Pairs come from a preference dataset (prompt/chosen/rejected, or the conversational form) read through the data
contract, or else from the SFT data itself (self-play, as in SPIN): chosen = the reference answer, rejected = the
SFT model's own greedy answer to that question. Either way they are an artifact with fingerprints: counts in =
pairs + quarantined + dropped, each drop with its reason.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from trl import DPOConfig, DPOTrainer

from medtune import models, rows
from medtune import train as sft
from medtune.config import Config
from medtune.metrics import token_f1
from medtune.preprocess import fingerprint, question_key, render_prompts, write_split

log = logging.getLogger(__name__)
PAIR_FIELDS = ("id", "question", "prompt", "chosen", "rejected")
SPLITS = ("train", "validation")
HISTORY_PREFIX = "dpo_"  # preference log entries in the run's history, apart from the SFT loss curve
BEST_METRIC = "eval_rewards/margins"
# The held-out scores reported before (the SFT policy) and after (what is saved) preference tuning.
SCORES = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
          "logps/rejected")


@dataclass
class Pairs:
    train: pd.DataFrame
    validation: pd.DataFrame
    source: str                                        # "dataset" or "self_play"
    counts: dict = field(default_factory=dict)         # rows_read, quarantined and dropped by rule
    dropped: list[dict] = field(default_factory=list)  # rows dropped after the contract, each with its rule
    validation_result: object | None = None            # dataset pairs: the contract's result (quarantine, docs)

    def summary(self) -> dict:
        splits = {name: {"pairs": len(df), "fingerprint": fingerprint(df, PAIR_FIELDS)}
                  for name, df in (("train", self.train), ("validation", self.validation))}
        return {"source": self.source, **self.counts, "splits": splits}


def write_pairs(pairs: Pairs, directory: Path) -> dict:
    """<split>/rows.jsonl (as the SFT splits), dropped.jsonl and summary.json (counts and sha256 fingerprints)."""
    for name in SPLITS:
        write_split(getattr(pairs, name), directory / name, PAIR_FIELDS)
    (directory / "dropped.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False, default=str) + "\n"
                                                     for d in pairs.dropped))
    summary = pairs.summary()
    (directory / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def read_pairs(directory: Path, name: str) -> pd.DataFrame:
    return rows.read(directory / name)


# ---------------------------------------------------------------------------------------------- pairs


def _dropped(row: dict, rule: str, detail: str) -> dict:
    return {"rule": rule, "detail": detail, "row": {k: row.get(k) for k in PAIR_FIELDS if row.get(k) is not None}}


def _held_out(key: str, fraction: float) -> bool:
    """A stable validation assignment by question, so a pair's split does not depend on row order."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32 < fraction


def pairs_from_dataset(cfg: Config, tokenizer, test_rows: pd.DataFrame) -> Pairs:
    """Validate `preference.data` with the data contract (pairs rules included), drop prompts that are in the
    test split (they would leak into the evaluation), and split the rest by question into train/validation."""
    from medtune import validate

    data = cfg.preference.data
    data = data.model_copy(update={"columns": {"prompt": "question", "chosen": "answer", **data.columns}})
    needs_tokens = data.max_question_tokens or data.max_answer_tokens
    result = validate.validate(data, tokenizer if needs_tokens else None, pairs=True)
    kept = result.kept
    contexts = kept["context"] if "context" in kept else [None] * len(kept)
    kept = kept.assign(prompt=render_prompts(tokenizer, cfg.preprocess.system_prompt, kept["question"], contexts),
                       chosen=kept["answer"], id=[str(i) for i in (kept["id"] if "id" in kept else kept.index)])
    test_keys = {question_key(q) for q in test_rows["question"]}
    keys = [question_key(q) for q in kept["question"]]
    leaked = np.array([k in test_keys for k in keys], dtype=bool)
    dropped = [_dropped(r, "pair.test_overlap", "the prompt is a question of the test split")
               for r in kept[leaked].to_dict(orient="records")]
    held = np.array([_held_out(k, cfg.preprocess.val_fraction) for k in keys], dtype=bool)
    train, val = kept[~leaked & ~held], kept[~leaked & held]
    counts = {"rows_read": result.summary["rows_read"], "rows_quarantined": result.summary["rows_quarantined"],
              "quarantined_by_rule": result.summary["quarantined_by_rule"],
              "dropped_by_rule": {"pair.test_overlap": int(leaked.sum())}}
    return _checked(Pairs(train[list(PAIR_FIELDS)].reset_index(drop=True),
                          val[list(PAIR_FIELDS)].reset_index(drop=True), "dataset", counts, dropped, result))


def self_play_pairs(cfg: Config, model, tokenizer, train_rows: pd.DataFrame, val_rows: pd.DataFrame) -> Pairs:
    """chosen = the reference answer, rejected = `model`'s greedy answer to the same question (batched
    generation as in evaluate); pairs whose answers are near-identical (token F1) are dropped and counted."""
    p = cfg.preference
    frames, dropped, by_rule, read = {}, [], {"pair.near_identical": 0}, 0
    for name, split in (("train", train_rows), ("validation", val_rows)):
        split = split.sample(n=min(len(split), p.max_pairs or len(split)), random_state=p.seed).reset_index(drop=True)
        read += len(split)
        rejected = _greedy(cfg, model, tokenizer, split["prompt"].tolist(), name)
        frame = pd.DataFrame({"id": split["id"].astype(str), "question": split["question"],
                              "prompt": split["prompt"], "chosen": split["answer"].astype(str),
                              "rejected": rejected})
        overlap = np.array([token_f1(r, [c]) for c, r in zip(frame["chosen"], frame["rejected"])])
        near = overlap >= p.near_identical
        dropped += [_dropped(r, "pair.near_identical", f"token F1 {f:.2f} >= preference.near_identical="
                             f"{p.near_identical}")
                    for r, f in zip(frame[near].to_dict(orient="records"), overlap[near])]
        by_rule["pair.near_identical"] += int(near.sum())
        frames[name] = frame[~near].reset_index(drop=True)
    counts = {"rows_read": read, "rows_quarantined": 0, "quarantined_by_rule": {}, "dropped_by_rule": by_rule}
    return _checked(Pairs(frames["train"], frames["validation"], "self_play", counts, dropped))


def _greedy(cfg: Config, model, tokenizer, prompts: list[str], split: str) -> list[str]:
    from medtune.evaluate import generate

    max_new = cfg.preference.max_new_tokens or cfg.eval.max_new_tokens
    try:
        return generate(model, tokenizer, prompts, cfg.eval.batch_size, max_new, desc=f"self-play {split}",
                        decoding=cfg.decoding)
    finally:
        tokenizer.padding_side = "right"  # generate pads on the left; training pads on the right


def _checked(pairs: Pairs) -> Pairs:
    """Nothing is silently lost: every row read is a pair, quarantined or dropped with a rule."""
    c = pairs.counts
    total = len(pairs.train) + len(pairs.validation) + c["rows_quarantined"] + sum(c["dropped_by_rule"].values())
    if total != c["rows_read"]:
        raise AssertionError(f"pair accounting broken: {c}, pairs {len(pairs.train)}+{len(pairs.validation)}")
    if pairs.train.empty:
        raise ValueError(f"no preference pairs left to train on ({pairs.source}): {c}")
    return pairs


# ---------------------------------------------------------------------------------------------- training


def load_policy(cfg: Config, sft_dir: Path):
    """The SFT result, trainable: base + SFT adapter (lora/qlora), or the SFT model with train.method's freezing."""
    if models.is_adapter_dir(sft_dir):
        from peft import PeftModel

        model = PeftModel.from_pretrained(models.load_model(cfg.model, cfg.train), str(sft_dir), is_trainable=True)
        sft.keep_float32_adapters(cfg, model)
        return model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(sft_dir), dtype=models.resolve_dtype(cfg.train.dtype))
    model.config.use_cache = False
    return sft.prepare_model(cfg, model)


def dpo_config(cfg: Config, output_dir: Path, has_eval: bool) -> DPOConfig:
    p = cfg.preference
    losses, weights = [p.loss_type], None
    if p.sft_weight:
        losses, weights = [p.loss_type, "sft"], [1.0, p.sft_weight]
    return DPOConfig(
        **sft.trainer_args(cfg, p, output_dir, has_eval, BEST_METRIC, greater_is_better=True),
        beta=p.beta,
        loss_type=losses,
        loss_weights=weights,
        max_length=p.max_length,
        # The reference (SFT) log-probabilities once, up front: no reference forward per step, no second model.
        precompute_ref_log_probs=True,
    )


def _dataset(df: pd.DataFrame):
    from datasets import Dataset

    return Dataset.from_pandas(df[["prompt", "chosen", "rejected"]].reset_index(drop=True), preserve_index=False)


def build_trainer(cfg: Config, policy, tokenizer, pairs: Pairs, output_dir: Path) -> DPOTrainer:
    torch.manual_seed(cfg.preference.seed)
    has_eval = not pairs.validation.empty
    trainer = DPOTrainer(model=policy, args=dpo_config(cfg, output_dir, has_eval), processing_class=tokenizer,
                         train_dataset=_dataset(pairs.train),
                         eval_dataset=_dataset(pairs.validation) if has_eval else None)
    drop_reference_adapter(trainer.model)
    return trainer


def drop_reference_adapter(model) -> None:
    """TRL keeps a frozen copy of a pretrained adapter as `ref`; with the reference log-probs precomputed it is
    no longer read, and left in place it would be checkpointed and saved next to the trained adapter."""
    if "ref" in getattr(model, "peft_config", {}):
        model.set_adapter("default")
        model.delete_adapter("ref")


@dataclass
class Preferred:
    adapter_dir: Path
    metrics: dict
    history: list[dict]


def run(cfg: Config, sft_dir: Path, train_rows: pd.DataFrame, val_rows: pd.DataFrame, test_rows: pd.DataFrame,
        adapter_dir: Path, pairs_dir: Path, work_dir: Path) -> tuple[Preferred, Pairs]:
    """Build or read the pairs, DPO-train the SFT result on them and save the one result to `adapter_dir`."""
    tokenizer = models.load_tokenizer(cfg.model)
    policy = load_policy(cfg, Path(sft_dir))
    if cfg.preference.data is not None:
        pairs = pairs_from_dataset(cfg, tokenizer, test_rows)
    else:
        pairs = self_play_pairs(cfg, policy, tokenizer, train_rows, val_rows)
    write_pairs(pairs, Path(pairs_dir))
    return train(cfg, policy, tokenizer, pairs, Path(adapter_dir), Path(work_dir)), pairs


def train(cfg: Config, policy, tokenizer, pairs: Pairs, adapter_dir: Path, work_dir: Path) -> Preferred:
    trainer = build_trainer(cfg, policy, tokenizer, pairs, work_dir / "checkpoints")
    trainer.add_callback(sft.ProgressEvents())
    has_eval = not pairs.validation.empty
    stop = cfg.preference.early_stopping
    stopper = sft.early_stopper(stop) if stop and has_eval else None
    if stopper:
        trainer.add_callback(stopper)
    # Held-out scores of the SFT policy (step 0) and of what is saved (the best checkpoint when early stopping).
    before = trainer.evaluate() if has_eval else {}
    result = trainer.train()
    best = sft.best_checkpoint_metrics(trainer, stopper)
    # train() starts a fresh state, so the step-0 validation is put back in front
    history = ([{"step": 0, **before}] if before else []) + list(trainer.state.log_history)
    after = _validated(history, best.get("best_step", trainer.state.global_step)) or \
        (trainer.evaluate() if has_eval else {})
    losses = [h["loss"] for h in history if "loss" in h]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise sft.TrainingFault("nan_loss", f"DPO loss is not finite: {losses[-5:]}; lower "
                                "preference.learning_rate or raise preference.beta")
    metrics = {"steps": int(trainer.state.global_step), "train_loss": float(result.training_loss),
               "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
               "pairs_train": len(pairs.train), "pairs_validation": len(pairs.validation),
               **{f"{when}_{k}": float(scores[f"eval_{k}"]) for when, scores in (("before", before), ("after", after))
                  for k in SCORES if f"eval_{k}" in scores},
               **best}
    save(trainer.model, tokenizer, adapter_dir)
    return Preferred(adapter_dir, metrics, [_prefixed(h) for h in history])


def _validated(history: list[dict], step: int) -> dict:
    """The held-out scores logged at `step`, if it was validated: what is saved then needs no second pass (the
    restored best checkpoint, or the last step; 30-40 s of a 2-core CPU's preference stage)."""
    return next((h for h in reversed(history) if h.get("step") == step and "eval_loss" in h), {})


def _prefixed(entry: dict) -> dict:
    return {k if k in ("step", "epoch") else HISTORY_PREFIX + k: v for k, v in entry.items()}


def save(model, tokenizer, adapter_dir: Path) -> None:
    """One servable result: the trained adapter alone (never the reference copy), or the whole model."""
    drop_reference_adapter(model)
    if adapter_dir.exists():
        shutil.rmtree(adapter_dir)
    models.save_result(model, tokenizer, adapter_dir)


def closing_note(summary: dict, decision: dict, comparison: dict) -> list[str]:
    """`medtune run`'s closing lines for the preference stage: pairs, held-out accuracy and margin before and
    after, and the gate's view of the SFT-only result next to SFT + DPO on the split and each suite."""
    if not summary.get("enabled"):
        return []
    m = summary["metrics"]
    splits = summary["pairs"]["splits"]
    dropped = sum(summary["pairs"]["dropped_by_rule"].values()) + summary["pairs"]["rows_quarantined"]
    lines = [f"{summary['pairs']['source']} pairs: {splits['train']['pairs']} train, "
             f"{splits['validation']['pairs']} held out, {dropped} dropped or quarantined"]
    if "before_rewards/accuracies" in m:
        lines.append(f"held-out preference accuracy {m['before_rewards/accuracies']:.3f} -> "
                     f"{m['after_rewards/accuracies']:.3f}, reward margin {m['before_rewards/margins']:.3f} -> "
                     f"{m['after_rewards/margins']:.3f} ({m['steps']} DPO steps)")
    sft_only = decision.get("sft_only")
    if sft_only:
        verdict = {True: "PASSED", False: "FAILED"}
        lines.append(f"gate on SFT only: {verdict[sft_only['passed']]}; on SFT + DPO: {verdict[decision['passed']]}")
    for name, scored in {"test": comparison, **(comparison.get("suites") or {})}.items():
        ci = (scored.get("ci") or {}).get("candidate_vs_sft") or {}
        deltas = [f"{metric} {(scored.get('sft') or {}).get(metric, float('nan')):.3f} -> "
                  f"{(scored.get('candidate') or {}).get(metric, float('nan')):.3f} "
                  f"[{ci[metric]['low']:+.3f}, {ci[metric]['high']:+.3f}]"
                  for metric in _primary(scored) if (ci.get(metric) or {}).get("low") is not None]
        if deltas:
            lines.append(f"{name}: SFT -> SFT + DPO " + ", ".join(deltas))
    return lines


def _primary(scored: dict) -> tuple[str, ...]:
    from medtune.metric_catalog import PRIMARY

    return PRIMARY.get(scored.get("kind", "free_text"), ())
