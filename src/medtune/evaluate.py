"""Score the base model and the candidate (base + adapter) on the same held-out rows.

Both answer with greedy decoding from one loaded base model: the candidate's adapter is simply switched
off for the base pass, so the two differ in the adapter and nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from medtune import metrics, models
from medtune.config import Config


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, desc: str) -> list[str]:
    """Greedy answers for rendered prompts, batched with left padding and the KV cache."""
    tokenizer.padding_side = "left"
    answers: list[str] = []
    # Sorting by length keeps padding (wasted compute) low; answers are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        answers += [t.strip() for t in texts]
    restored = [""] * len(prompts)
    for position, i in enumerate(order):
        restored[i] = answers[position]
    return restored


@dataclass
class Evaluation:
    base: dict
    candidate: dict
    predictions: pd.DataFrame

    def comparison(self) -> dict:
        return {
            "n": int(len(self.predictions)),
            "base": self.base,
            "candidate": self.candidate,
            "delta": {k: self.candidate[k] - self.base[k] for k in metrics.METRICS},
        }


def load_candidate(cfg: Config, adapter_dir: Path):
    from peft import PeftModel

    base = models.load_model(cfg.model, cfg.train).to(models.device())
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.config.use_cache = True
    return model


def evaluate(cfg: Config, test_rows: pd.DataFrame, adapter_dir: Path) -> Evaluation:
    rows = test_rows.head(cfg.eval.max_rows) if cfg.eval.max_rows else test_rows
    if rows.empty:
        raise ValueError("the test split is empty: add data or raise preprocess.test_fraction")
    tokenizer = models.load_tokenizer(cfg.model, padding_side="left")
    model = load_candidate(cfg, adapter_dir)
    prompts = rows["prompt"].tolist()
    references = [[a] for a in rows["answer"]]
    gen = dict(batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens)
    with model.disable_adapter():
        base_answers = generate(model, tokenizer, prompts, desc="base model", **gen)
    candidate_answers = generate(model, tokenizer, prompts, desc="candidate", **gen)
    base_scores, base_rows = metrics.score(base_answers, references)
    cand_scores, cand_rows = metrics.score(candidate_answers, references)
    predictions = rows[["id", "question", "answer", "focus", "qtype"]].copy()
    predictions["base_answer"] = base_answers
    predictions["candidate_answer"] = candidate_answers
    for name in ("token_f1", "rougeL"):
        predictions[f"base_{name}"] = [r[name] for r in base_rows]
        predictions[f"candidate_{name}"] = [r[name] for r in cand_rows]
    return Evaluation(base=base_scores, candidate=cand_scores, predictions=predictions)


def write_outputs(result: Evaluation, comparison_path: Path, predictions_dir: Path) -> None:
    comparison_path.parent.mkdir(parents=True, exist_ok=True)
    comparison_path.write_text(json.dumps(result.comparison(), indent=2))
    predictions_dir.mkdir(parents=True, exist_ok=True)
    result.predictions.to_json(predictions_dir / "predictions.jsonl", orient="records", lines=True,
                               force_ascii=False)
