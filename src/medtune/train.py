"""Fine-tune a LoRA/QLoRA adapter with TRL's SFTTrainer on prompt/completion rows.

The rows are already rendered with the chat template (preprocess), and a prompt/completion dataset makes
SFTTrainer compute the loss on the answer tokens only: the model learns to answer, not to echo questions.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from medtune import models
from medtune.config import Config

log = logging.getLogger(__name__)


@dataclass
class Trained:
    adapter_dir: Path
    metrics: dict
    history: list[dict]


def lora_config(cfg: Config):
    from peft import LoraConfig

    lora = cfg.train.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, bias="none", task_type="CAUSAL_LM")


def sft_config(cfg: Config, output_dir: Path, has_eval: bool):
    from trl import SFTConfig

    t = cfg.train
    precision = t.quantization.compute_dtype if t.method == "qlora" else t.dtype
    on_gpu = torch.cuda.is_available()
    return SFTConfig(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        num_train_epochs=t.epochs,
        max_steps=t.max_steps,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay,
        gradient_checkpointing=t.gradient_checkpointing,
        bf16=precision == "bfloat16" and on_gpu,
        fp16=precision == "float16" and on_gpu,
        use_cpu=not on_gpu,
        max_length=cfg.preprocess.max_tokens,
        completion_only_loss=True,
        logging_steps=t.logging_steps,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="no",
        report_to="none",
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=0,
    )


def _dataset(df: pd.DataFrame):
    from datasets import Dataset

    return Dataset.from_pandas(df[["prompt", "completion"]].reset_index(drop=True), preserve_index=False)


def train(cfg: Config, train_rows: pd.DataFrame, val_rows: pd.DataFrame, adapter_dir: Path,
          work_dir: Path) -> Trained:
    from trl import SFTTrainer

    torch.manual_seed(cfg.train.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_model(cfg.model, cfg.train)
    trainer = SFTTrainer(
        model=model,
        args=sft_config(cfg, work_dir, has_eval=not val_rows.empty),
        train_dataset=_dataset(train_rows),
        eval_dataset=_dataset(val_rows) if not val_rows.empty else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg),
    )
    result = trainer.train()
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise FloatingPointError(f"training loss is not finite: {losses[-5:]}; lower train.learning_rate")
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    metrics = {
        "train_loss": float(result.training_loss),
        "first_logged_loss": float(losses[0]),
        "last_logged_loss": float(losses[-1]),
        "steps": int(trainer.state.global_step),
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "trainable_params": int(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)),
    }
    if eval_losses:
        metrics["eval_loss"] = float(eval_losses[-1])
    trainer.model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return Trained(adapter_dir=adapter_dir, metrics=metrics, history=history)
