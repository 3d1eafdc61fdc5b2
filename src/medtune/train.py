"""Fine-tune with TRL's SFTTrainer on prompt/completion rows: LoRA, QLoRA, DoRA/rsLoRA, full (optionally frozen
bottom layers) or feature-based (frozen backbone, top blocks and/or LM head trained), with the loss on the answer
tokens only. With `train.early_stopping` the best checkpoint by validation loss is what is saved.

Where the time goes on a CPU, and what this module does about it (see benchmarks/train_throughput.py):

- dtype: a bf16 matmul is several times slower than float32 on CPUs without AVX512-BF16/AMX, and TRL's default
  (`bf16=True`) autocasts every Linear to bf16. `train.dtype: auto` picks bf16 only where it is native.
- padding: batches are concatenated into one row (padding-free; position_ids keep the sequences apart), so no
  pad token is ever computed. Rows are already cut to `preprocess.max_tokens` by preprocess.
- the LM head: TRL's fused head scores every position on devices without Triton (CPU), prompt and padding
  included, and computes entropy/top-1 statistics over the whole vocabulary. Here the head runs only on the
  labelled (answer) positions; on CUDA TRL's fused head already does that and is used as is.
- gradient checkpointing: TRL turns it on by default (~30% more compute); it is off unless configured.

Speed metrics (logged per step, and the run's figures): tokens_per_s is the non-padding tokens of the steps after
the first (warm-up) one over those steps' time, a running total rather than a mean of interval rates; mfu is their
useful FLOPs over the device peak from medtune.throughput, and absent where that peak is unknown.

Faults stop the run with a `TrainingFault` that names the kind (nan_loss, lr_explosion, out_of_memory) and what to
change. Checkpoints are written every `train.checkpoint_steps` and on SIGTERM; a restarted step resumes from the
last complete one (step counter, optimizer, scheduler, RNG and data order).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import resource
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from transformers import EarlyStoppingCallback, TrainerCallback
from trl import SFTConfig, SFTTrainer

from medtune import models, runview, throughput
from medtune.config import ADAPTER_METHODS, Config

log = logging.getLogger(__name__)
HEAD_CHUNK = 2048  # labelled tokens per LM-head chunk: bounds the (tokens x vocab) logits held for backward


@dataclass
class Trained:
    adapter_dir: Path
    metrics: dict
    history: list[dict]
    checkpoint: Path | None = None  # set when the run stopped at its screen: resume from here to finish it


class TrainingFault(RuntimeError):
    """A run stopped on purpose. `kind`: nan_loss, lr_explosion or out_of_memory; the message says what to change."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


class Preempted(RuntimeError):
    """SIGTERM arrived; a checkpoint was saved and a restarted step resumes from it."""


class ExportError(RuntimeError):
    """The merged model does not reproduce base+adapter within tolerance."""


# ---------------------------------------------------------------------------------------------- configuration


def lora_config(cfg: Config):
    from peft import LoraConfig

    lora = cfg.train.lora
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, use_dora=lora.use_dora, use_rslora=lora.use_rslora,
                      bias="none", task_type="CAUSAL_LM")


def trainer_args(cfg: Config, stage, output_dir: Path, has_eval: bool, best_metric: str,
                 greater_is_better: bool) -> dict:
    """Arguments SFT and preference training share. `stage` (cfg.train or cfg.preference) sets the batch, steps,
    rate, validation and early stopping (a checkpoint at every validation, the best one restored at the end);
    cfg.train sets precision, device, schedule shape and checkpoints for both."""
    t = cfg.train
    on_gpu = torch.cuda.is_available()
    precision = models.compute_dtype(t)
    # On CPU the weights are loaded in the compute dtype and no autocast is used; on GPU a QLoRA/LoRA run autocasts.
    autocast = on_gpu and t.method == "qlora"
    eval_strategy = "no" if not has_eval else "steps" if stage.eval_steps else "epoch"
    checkpoints = dict(save_strategy="steps" if t.checkpoint_steps else "no", save_steps=t.checkpoint_steps or 500)
    if has_eval and stage.early_stopping:
        checkpoints = dict(save_strategy=eval_strategy, save_steps=stage.eval_steps or 500,
                           load_best_model_at_end=True, metric_for_best_model=best_metric,
                           greater_is_better=greater_is_better)
    return dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=stage.batch_size,
        per_device_eval_batch_size=stage.batch_size,
        gradient_accumulation_steps=stage.grad_accum,
        num_train_epochs=stage.epochs,
        max_steps=stage.max_steps,
        learning_rate=stage.learning_rate,
        logging_steps=stage.logging_steps,
        seed=stage.seed,
        data_seed=stage.seed,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        activation_checkpointing=t.gradient_checkpointing,  # transformers 5 name (gradient_checkpointing: alias)
        bf16=autocast and precision == torch.bfloat16,
        fp16=autocast and precision == torch.float16,
        use_cpu=not on_gpu,
        eval_strategy=eval_strategy,
        eval_steps=stage.eval_steps,
        **checkpoints,
        save_total_limit=t.keep_checkpoints,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def sft_config(cfg: Config, output_dir: Path, has_eval: bool) -> SFTConfig:
    t = cfg.train
    return SFTConfig(
        **trainer_args(cfg, t, output_dir, has_eval, "eval_loss", greater_is_better=False),
        padding_free=padding_free(t),
        # Padded batches: rows of similar length together, so little padding is computed.
        train_sampling_strategy="random" if padding_free(t) else "group_by_length",
        packing=t.packing,
        packing_strategy="bfd",
        # Rows are already cut to the token budget by preprocess; padding-free without packing needs None here.
        max_length=cfg.preprocess.max_tokens if t.packing or not padding_free(t) else None,
        completion_only_loss=t.completion_only_loss,
    )


def early_stopper(stop) -> EarlyStoppingCallback:
    return EarlyStoppingCallback(early_stopping_patience=stop.patience, early_stopping_threshold=stop.threshold)


def best_checkpoint_metrics(trainer, stopper: EarlyStoppingCallback | None) -> dict:
    """What early stopping did: the step whose checkpoint was restored, its metric, and where training stopped
    (-1: it ran to the end)."""
    state = trainer.state
    if stopper is None or state.best_model_checkpoint is None:
        return {}
    stopped = stopper.early_stopping_patience_counter >= stopper.early_stopping_patience
    return {"best_step": int(Path(state.best_model_checkpoint).name.removeprefix("checkpoint-")),
            "best_metric": float(state.best_metric),
            "early_stopped_at_step": int(state.global_step) if stopped else -1}


def padding_free(t) -> bool:
    """train.padding_free resolved. auto: padded, length-grouped batches on CPU, where
    benchmarks/train_throughput.py --ablations measured them faster in both dtypes (attention over one
    concatenated row is quadratic in the batch's tokens, and length grouping leaves little padding);
    padding-free with packing (TRL packs into such rows) and on CUDA (not measured yet: the CUDA ablation row)."""
    if t.padding_free != "auto":
        return t.padding_free
    return t.packing or models.device().type == "cuda"


def checkpoint_key(cfg: Config, run_id: str) -> str:
    """Folder name under train.checkpoint_dir: a retried step of the same run and config finds its checkpoints."""
    sections = {k: cfg.model_dump(mode="json")[k] for k in ("model", "preprocess", "train")}
    digest = hashlib.sha256(json.dumps(sections, sort_keys=True).encode()).hexdigest()[:12]
    return f"{run_id}-{digest}"


def last_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last, so a kill mid-save is skipped)."""
    if not directory.is_dir():
        return None
    done = [p for p in directory.glob("checkpoint-*") if (p / "trainer_state.json").exists()
            and p.name.removeprefix("checkpoint-").isdigit()]
    return max(done, key=lambda p: int(p.name.removeprefix("checkpoint-")), default=None)


# ---------------------------------------------------------------------------------------------- the model


def prepare_model(cfg: Config, model=None):
    """Load the base model (or take `model`); method=full: freeze the embeddings and the first `freeze_layers`
    decoder layers; method=feature: freeze everything but the top `feature_layers` blocks and/or the LM head."""
    model = model if model is not None else models.load_model(cfg.model, cfg.train)
    if cfg.train.method == "feature":
        freeze_backbone(model, cfg.train.feature_layers, cfg.train.feature_head)
    if cfg.train.method == "full" and cfg.train.freeze_layers:
        layers = _decoder_layers(model)
        if cfg.train.freeze_layers > len(layers):
            raise ValueError(f"train.freeze_layers={cfg.train.freeze_layers} but the model has {len(layers)} layers")
        model.get_input_embeddings().requires_grad_(False)  # tied models freeze the head with it
        for layer in layers[: cfg.train.freeze_layers]:
            layer.requires_grad_(False)
    return model


def freeze_backbone(model, top_layers: int, head: bool) -> None:
    """Feature-based fine-tuning: only the top `top_layers` decoder blocks and (if `head`) the LM head train."""
    layers = _decoder_layers(model)
    if top_layers > len(layers):
        raise ValueError(f"train.feature_layers={top_layers} but the model has {len(layers)} layers")
    model.requires_grad_(False)
    for layer in layers[len(layers) - top_layers:]:
        layer.requires_grad_(True)
    if head:
        output, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
        if output.weight is embeddings.weight:  # tied: give the head its own copy so the input side stays frozen
            output.weight = torch.nn.Parameter(embeddings.weight.detach().clone())
            model.config.tie_word_embeddings = False
            if hasattr(model.config, "get_text_config"):
                model.config.get_text_config().tie_word_embeddings = False
        output.requires_grad_(True)


def _decoder_layers(model) -> torch.nn.ModuleList:
    backbone = model.base_model
    layers = getattr(backbone, "layers", None) or getattr(backbone, "h", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")
    return layers


_causal_lm = throughput.causal_lm


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------- the trainer


class MedtuneTrainer(SFTTrainer):
    """SFTTrainer with the LM head on labelled tokens only, fault checks and cost metrics."""

    def __init__(self, *args, medtune_cfg: Config, **kwargs):
        super().__init__(*args, **kwargs)
        self.medtune_cfg = medtune_cfg
        # TRL's fused head scores only labelled positions where Triton runs (CUDA); elsewhere it scores every one.
        self.fused_head = torch.cuda.is_available() and _triton_available()
        self.tokens_seen = 0      # non-padding tokens through the model
        self.best_loss = math.inf
        self.smoothed_loss: float | None = None
        self.clock = throughput.StepClock(warmup=1)  # the first step (allocation, kernel selection) is not timed
        self.add_callback(self.clock)
        body, head = throughput.matmul_params(self.model)
        trainable = any(p.requires_grad for p in _causal_lm(self.model).get_output_embeddings().parameters())
        # Forward 2 FLOPs/weight; backward 2 for the input gradient plus 2 for trainable weights (LoRA: ~none).
        frozen_base = medtune_cfg.train.method in ADAPTER_METHODS
        trainable_body = 0 if frozen_base else sum(
            m.in_features * m.out_features for m in _causal_lm(self.model).modules()
            if isinstance(m, torch.nn.Linear) and m.weight.requires_grad
            and m is not _causal_lm(self.model).get_output_embeddings())
        self.flops_per_token = 4 * body + 2 * trainable_body
        self.flops_per_labelled = (6 if trainable else 4) * head
        self._peak: float | None | bool = False  # measured on first use, outside the timed steps

    @property
    def peak(self) -> float | None:
        if self._peak is False:
            # The matmul rate saturates at a few hundred rows, so the CPU probe caps its rows at 512 to stay quick.
            t = self.medtune_cfg.train
            rows = min(t.batch_size * self.medtune_cfg.preprocess.max_tokens, 512)
            self._peak = throughput.device_peak(self.model, models.compute_dtype(t), rows, t.peak_tflops)
        return self._peak

    # -- loss ---------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            return super().compute_loss(model, inputs, True, num_items_in_batch)
        inputs = {**inputs, "use_cache": False}
        if self.fused_head:
            out = model(**inputs, fused_lm_head=True)
            nll, n = -out.log_probs.sum(), out.label_mask.sum()
        else:
            nll, n = labelled_nll(model, inputs)
        loss = nll / (num_items_in_batch if num_items_in_batch is not None else n.clamp(min=1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        if model.training:
            mask = inputs.get("attention_mask")
            tokens = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            self.tokens_seen += tokens
            self.clock.add(tokens, int(n))
            self._check(float(nll.detach()) / max(int(n), 1))
        return loss

    def _check(self, token_loss: float) -> None:
        t = self.medtune_cfg.train
        step, lr = self.state.global_step, self._current_lr()
        if not math.isfinite(token_loss):
            raise TrainingFault(
                "nan_loss", f"the training loss became {token_loss} at step {step} (learning rate {lr:.3g}). "
                f"Lower train.learning_rate (now {t.learning_rate:g}), keep train.max_grad_norm (now "
                f"{t.max_grad_norm:g}) small, and train in float32 or bfloat16 rather than float16.")
        self.smoothed_loss = token_loss if self.smoothed_loss is None else 0.5 * self.smoothed_loss + 0.5 * token_loss
        self.best_loss = min(self.best_loss, self.smoothed_loss)
        if step >= 2 and self.smoothed_loss > t.divergence_factor * self.best_loss:
            raise TrainingFault(
                "lr_explosion", f"the training loss rose to {self.smoothed_loss:.3f} at step {step}, "
                f"{self.smoothed_loss / self.best_loss:.1f}x its lowest value {self.best_loss:.3f} (learning rate "
                f"{lr:.3g}): the learning rate is too high. Lower train.learning_rate (now {t.learning_rate:g}) "
                f"about 10x, or raise train.warmup_ratio (now {t.warmup_ratio:g}).")

    def _current_lr(self) -> float:
        try:
            return float(self.lr_scheduler.get_last_lr()[0])
        except (AttributeError, IndexError, TypeError):
            return float(self.args.learning_rate)

    def training_step(self, *args, **kwargs):
        try:
            return super().training_step(*args, **kwargs)
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise out_of_memory(self.medtune_cfg, exc) from exc
        except RuntimeError as exc:
            if "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower():
                raise out_of_memory(self.medtune_cfg, exc) from exc
            raise

    # -- metrics ------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:  # a training log: the cost so far, over the timed steps (after the warm-up)
            logs.update(peak_memory_mb=peak_memory_mb(), tokens=float(self.tokens_seen), **self.speed())
            grad_norm = logs.get("grad_norm")
            if grad_norm is not None and not math.isfinite(grad_norm):
                t = self.medtune_cfg.train
                raise TrainingFault("nan_loss", f"the gradient norm became {grad_norm} at step "
                                    f"{self.state.global_step}. Lower train.learning_rate (now {t.learning_rate:g}) "
                                    "and train in float32 or bfloat16 rather than float16.")
        super().log(logs, start_time)

    def speed(self) -> dict[str, float]:
        """tokens_per_s (total timed tokens / total timed seconds) and mfu, once a timed step has finished; mfu
        only where the device peak is known (configured, a listed GPU) or measured (CPU)."""
        rate = self.clock.tokens_per_s
        if rate is None:
            return {}
        flops = self.clock.flops_per_s(self.flops_per_token, self.flops_per_labelled)
        return {"tokens_per_s": rate, **({"mfu": flops / self.peak} if self.peak else {})}


def _triton_available() -> bool:
    from transformers.utils import is_triton_available

    return is_triton_available()


def labelled_nll(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL over the labelled positions, and their count, running the LM head on those only."""
    causal_lm = _causal_lm(model)
    labels = inputs["labels"]
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    hidden = causal_lm.base_model(**forward).last_hidden_state
    targets = labels[:, 1:]
    mask = targets != -100
    selected, targets = hidden[:, :-1][mask], targets[mask]
    head = causal_lm.get_output_embeddings()
    nll = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, targets.numel(), HEAD_CHUNK):
        h, t = selected[start:start + HEAD_CHUNK], targets[start:start + HEAD_CHUNK]
        if targets.numel() > HEAD_CHUNK:  # recompute the chunk's logits in backward instead of keeping them
            nll = nll + torch.utils.checkpoint.checkpoint(_chunk_nll, head, h, t, use_reentrant=False)
        else:
            nll = nll + _chunk_nll(head, h, t)
    if targets.numel() == 0:
        nll = nll + hidden.sum() * 0.0  # keep the graph connected for an all-masked batch
    return nll, mask.sum()


def _chunk_nll(head, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def out_of_memory(cfg: Config, exc: BaseException) -> TrainingFault:
    t = cfg.train
    where = "GPU" if torch.cuda.is_available() else "host RAM"
    hints = [f"lower train.batch_size (now {t.batch_size}) and raise train.grad_accum (now {t.grad_accum}) to keep "
             "the effective batch"]
    if not t.gradient_checkpointing:
        hints.append("set train.gradient_checkpointing=true")
    if t.method != "qlora":
        hints.append("use train.method=qlora")
    hints.append(f"lower preprocess.max_tokens (now {cfg.preprocess.max_tokens})")
    return TrainingFault("out_of_memory", f"training ran out of {where} ({type(exc).__name__}: "
                         f"{str(exc)[:200]}). " + "; or ".join(hints) + ".")


class ScreenStop(TrainerCallback):
    """Successive halving's screen: stop after `fraction` of the planned steps, validated and checkpointed.

    The schedule stays the full run's (warm-up and decay over all planned steps), so resuming the checkpoint
    trains exactly the steps an uninterrupted run would have: the winner of a screened sweep ends with the
    weights it would have had if it had trained straight through. A validation the straight run would not have
    made there draws a seed from the RNG (each DataLoader does), which would change every dropout mask after it,
    so the RNG is put back as it was before that validation, and the checkpoint saves it so."""

    def __init__(self, fraction: float):
        self.fraction = fraction
        self.step: int | None = None
        self.stopped_at: int | None = None
        self._rng = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.step = max(1, math.ceil(self.fraction * state.max_steps))

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != self.step or self.step >= state.max_steps:
            return
        control.should_save = True
        control.should_training_stop = True
        self.stopped_at = state.global_step
        if args.eval_strategy == "no":
            return
        scheduled = args.eval_strategy == "steps" and state.eval_steps and state.global_step % state.eval_steps == 0
        if not scheduled:
            self._rng = (torch.random.get_rng_state(),
                         torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        control.should_evaluate = True  # the selection metric at the screen (before the checkpoint is saved)

    def on_evaluate(self, args, state, control, **kwargs):
        if self._rng is not None:
            cpu, cuda = self._rng
            torch.random.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
            self._rng = None

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # validated at the screen already: not again at the epoch's end
            control.should_evaluate = False


class SigtermCheckpoint(TrainerCallback):
    """On SIGTERM (a preempted node): finish the current step, save a checkpoint, stop."""

    def __init__(self):
        self.received = False
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        self.received = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.received:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class ProgressEvents(TrainerCallback):
    """Step, loss and speed as they are logged, for the step line of `medtune run` (runview)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        figures = {k: logs[k] for k in ("loss", "eval_loss", "tokens_per_s") if k in (logs or {})}
        runview.emit(step=state.global_step, max_steps=state.max_steps, **figures)


# ---------------------------------------------------------------------------------------------- training


def _dataset(df: pd.DataFrame):
    from datasets import Dataset

    return Dataset.from_pandas(df[["prompt", "completion"]].reset_index(drop=True), preserve_index=False)


def build_trainer(cfg: Config, train_rows: pd.DataFrame, val_rows: pd.DataFrame, output_dir: Path,
                  tokenizer=None, model=None) -> MedtuneTrainer:
    torch.manual_seed(cfg.train.seed)
    tokenizer = tokenizer or models.load_tokenizer(cfg.model)
    model = model if model is not None else prepare_model(cfg)
    trainer = MedtuneTrainer(
        model=model,
        args=sft_config(cfg, output_dir, has_eval=not val_rows.empty),
        train_dataset=_dataset(train_rows),
        eval_dataset=_dataset(val_rows) if not val_rows.empty else None,
        processing_class=tokenizer,
        peft_config=lora_config(cfg) if cfg.train.method in ADAPTER_METHODS else None,
        medtune_cfg=cfg,
    )
    keep_float32_adapters(cfg, trainer.model)
    return trainer


def keep_float32_adapters(cfg: Config, model) -> None:
    """TRL casts QLoRA adapters to bf16; with a float32 compute dtype (CPUs without bf16) keep them float32."""
    if cfg.train.method == "qlora" and models.compute_dtype(cfg.train) == torch.float32:
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()


def train(cfg: Config, train_rows: pd.DataFrame, val_rows: pd.DataFrame, adapter_dir: Path, work_dir: Path,
          checkpoint_dir: Path | None = None, screen_fraction: float = 1.0) -> Trained:
    """Train and save to `adapter_dir` (adapter for lora/qlora, the whole model for full).

    `checkpoint_dir` holds resumable checkpoints; a rerun with the same folder continues from the last one.
    `screen_fraction` < 1 stops after that fraction of the planned steps (a sweep's screen, see ScreenStop): the
    result's `checkpoint` then resumes the run to its end on the same schedule.
    """
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else Path(work_dir) / "checkpoints"
    trainer = build_trainer(cfg, train_rows, val_rows, checkpoint_dir)
    sigterm = SigtermCheckpoint()
    trainer.add_callback(sigterm)
    trainer.add_callback(ProgressEvents())
    screen = ScreenStop(screen_fraction) if screen_fraction < 1 else None
    if screen:
        trainer.add_callback(screen)
    stopper = early_stopper(cfg.train.early_stopping) if cfg.train.early_stopping and not val_rows.empty else None
    if stopper:
        trainer.add_callback(stopper)
    resume = last_checkpoint(checkpoint_dir)
    if resume:
        log.info("resuming from %s", resume)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    if sigterm.received:
        raise Preempted(f"stopped by SIGTERM at step {trainer.state.global_step}; checkpoint saved in "
                        f"{checkpoint_dir}; run the step again to resume")
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    if not losses or not all(math.isfinite(x) for x in losses):
        raise TrainingFault("nan_loss", f"training loss is not finite: {losses[-5:]}; lower train.learning_rate")
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    metrics = {
        "train_loss": float(result.training_loss),
        "first_logged_loss": float(losses[0]),
        "last_logged_loss": float(losses[-1]),
        "steps": int(trainer.state.global_step),
        "train_runtime_s": float(result.metrics.get("train_runtime", 0.0)),
        "trainable_params": int(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)),
        "peak_memory_mb": float(peak_memory_mb()),
        **trainer.speed(),  # absent for a one-step run (nothing timed after the warm-up) and mfu on unknown GPUs
        "resumed_from_step": int(resume.name.removeprefix("checkpoint-")) if resume else 0,
    }
    if eval_losses:
        metrics["eval_loss"] = float(eval_losses[-1])
    metrics.update(best_checkpoint_metrics(trainer, stopper))
    if "best_metric" in metrics:
        metrics["eval_loss"] = metrics["best_metric"]  # the restored checkpoint's, not the last validation's
    stopped_at = screen.stopped_at if screen else None
    if stopped_at is not None:
        metrics["planned_steps"] = int(trainer.state.max_steps)
    adapter_dir = Path(adapter_dir)
    models.save_result(trainer.model, trainer.processing_class, adapter_dir)
    if cfg.train.export_merged and cfg.train.method in ADAPTER_METHODS and stopped_at is None:
        probe = (train_rows["prompt"] + train_rows["completion"]).head(4).tolist()
        metrics["merge_max_abs_diff"] = export_merged(cfg, adapter_dir, adapter_dir / "merged", probe)
    return Trained(adapter_dir=adapter_dir, metrics=metrics, history=history,
                   checkpoint=checkpoint_dir / f"checkpoint-{stopped_at}" if stopped_at is not None else None)


def export_merged(cfg: Config, adapter_dir: Path, out_dir: Path, texts: list[str]) -> float:
    """Fold the adapter into the base weights; fail unless merged and base+adapter logits agree on `texts`."""
    from peft import PeftModel

    tokenizer = models.load_tokenizer(cfg.model)
    # Merge into unquantized float32 weights: merging into 4-bit weights would re-quantize (lossy).
    f32 = cfg.train.model_copy(update={"dtype": "float32", "quantization": cfg.train.quantization.model_copy(
        update={"compute_dtype": "float32"})})
    base = models.load_model(cfg.model, f32, quantize=False)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        reference = model(**batch).logits
        merged = model.merge_and_unload()
        logits = merged(**batch).logits
    keep = batch["attention_mask"].bool()
    diff = float((reference - logits).abs()[keep].max())
    if not diff <= cfg.train.merge_tolerance:
        raise ExportError(f"merged model differs from base+adapter by {diff:.3g} > train.merge_tolerance="
                          f"{cfg.train.merge_tolerance:g}; the merged export was not written")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "PARITY.json").write_text(json.dumps({"max_abs_logit_diff": diff, "texts": len(texts),
                                                     "tolerance": cfg.train.merge_tolerance}))
    return diff
