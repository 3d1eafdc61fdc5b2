"""Training throughput: medtune's train step vs a plain TRL SFTTrainer script with library defaults.

Both train the default local profile (configs/local.yaml: SmolLM2-135M-Instruct, LoRA r=16 on all linear layers,
the sample data's train split, the same batch size and max length) for a fixed number of steps, each in its own
process (so peak RSS is per run). Tokens/second counts non-padding tokens over the timed steps (the first
`--warmup` steps are not timed). Optional ablations switch one of medtune's choices back to find where time goes.

    .venv/bin/python benchmarks/train_throughput.py [--steps 6] [--warmup 1] [--ablations]

The last line is `ratio=<medtune tokens/s / plain tokens/s>`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "configs" / "local.yaml"

# variant -> (description, train.* overrides); "plain" is the TRL script, the rest run medtune's train step.
VARIANTS = {
    "plain": ("plain TRL SFTTrainer, library defaults", {}),
    "plain+fp32": ("plain TRL SFTTrainer, defaults but bf16=False", {}),
    "medtune": ("medtune train step (configs/local.yaml)", {}),
    "medtune+bf16": ("medtune, but dtype=bfloat16", {"dtype": "bfloat16"}),
    "medtune+padded": ("medtune, but padded batches", {"padding_free": False}),
    "medtune+ckpt": ("medtune, but gradient checkpointing", {"gradient_checkpointing": True}),
    "medtune+trl_head": ("medtune, but TRL's LM head (every position)", {}),
}


def _data(cfg):
    """The profile's train split, exactly as preprocess makes it."""
    import pandas as pd

    from medtune import models
    from medtune import preprocess as prep

    tokenizer = models.load_tokenizer(cfg.model)
    rows = pd.read_json(ROOT / cfg.data.path, orient="records", lines=True)
    return prep.prepare(rows, tokenizer, cfg.preprocess).splits["train"], tokenizer


class Timer:
    """Counts non-padding tokens per optimizer step and times the steps after the warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.tokens, self.t0, self.t1, self.step_tokens = warmup, 0, None, None, 0

    def wrap(self, trainer):
        from transformers import TrainerCallback

        inner = trainer.training_step
        timer = self

        def training_step(model, inputs, *args, **kwargs):
            mask = inputs.get("attention_mask")
            timer.step_tokens += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            return inner(model, inputs, *args, **kwargs)

        class Clock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                if state.global_step == timer.warmup:
                    timer.t0 = time.perf_counter()
                timer.step_tokens = 0

            def on_step_end(self, args, state, control, **kw):
                if state.global_step > timer.warmup:
                    timer.tokens += timer.step_tokens
                    timer.t1 = time.perf_counter()

        trainer.training_step = training_step
        trainer.add_callback(Clock())


def run_variant(name: str, steps: int, warmup: int) -> dict:
    import torch

    from medtune import config as config_mod
    from medtune import models

    cfg = config_mod.load(PROFILE)
    overrides = dict(VARIANTS[name][1], max_steps=steps + warmup, checkpoint_steps=0, logging_steps=1000)
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=overrides)})
    rows, tokenizer = _data(cfg)
    out = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    timer = Timer(warmup)
    if name.startswith("plain"):
        from datasets import Dataset
        from peft import LoraConfig
        from trl import SFTConfig, SFTTrainer

        lora = cfg.train.lora
        args = SFTConfig(output_dir=str(out), per_device_train_batch_size=cfg.train.batch_size,
                         max_length=cfg.preprocess.max_tokens, max_steps=steps + warmup, report_to="none",
                         save_strategy="no", seed=cfg.train.seed, disable_tqdm=True,
                         use_cpu=not torch.cuda.is_available(),  # TRL refuses its bf16 default on CPU without it
                         **({"bf16": False} if name == "plain+fp32" else {}))
        trainer = SFTTrainer(
            model=models.resolve(cfg.model), args=args, processing_class=tokenizer,
            train_dataset=Dataset.from_pandas(rows[["prompt", "completion"]], preserve_index=False),
            peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                   target_modules=lora.target_modules, task_type="CAUSAL_LM"))
        settings = {"bf16": args.bf16, "activation_checkpointing": args.activation_checkpointing,
                    "padding_free": args.padding_free, "dtype": str(trainer.model.dtype)}
    else:
        from trl import SFTTrainer

        from medtune import train as medtune_train

        if name == "medtune+trl_head":
            medtune_train.MedtuneTrainer.compute_loss = SFTTrainer.compute_loss
        trainer = medtune_train.build_trainer(cfg, rows, rows.head(0), out, tokenizer=tokenizer)
        settings = {"bf16": trainer.args.bf16, "activation_checkpointing": trainer.args.activation_checkpointing,
                    "padding_free": trainer.args.padding_free, "dtype": str(models.compute_dtype(cfg.train))}
    timer.wrap(trainer)
    trainer.train()
    elapsed = timer.t1 - timer.t0
    return {"variant": name, "what": VARIANTS[name][0], "timed_steps": steps, "tokens": timer.tokens,
            "seconds": round(elapsed, 2), "tokens_per_s": round(timer.tokens / elapsed, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "batch_size": cfg.train.batch_size, "max_length": cfg.preprocess.max_tokens,
            "torch_threads": torch.get_num_threads(), **settings}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--ablations", action="store_true", help="also run the one-change-back variants")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="run just these variants")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args.steps, args.warmup)), flush=True)
        return

    import torch
    import transformers
    import trl

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}, load avg {os.getloadavg()[0]:.1f}")
    names = ["plain", "medtune"] + ([n for n in VARIANTS if "+" in n] if args.ablations else [])
    names = args.only or names
    results = {}
    for name in names:
        proc = subprocess.run([sys.executable, __file__, "--variant", name, "--steps", str(args.steps),
                               "--warmup", str(args.warmup)], capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line.removeprefix("RESULT "))
        r = results[name]
        print(f"{name:18s} {r['tokens_per_s']:8.1f} tokens/s  peak RSS {r['peak_rss_mb']:6d} MB  "
              f"({r['tokens']} tokens / {r['seconds']} s; bf16={r['bf16']} ckpt={r['activation_checkpointing']} "
              f"padding_free={r['padding_free']} dtype={r['dtype']})  {r['what']}", flush=True)
    print(json.dumps(results))
    if "plain" in results and "medtune" in results:
        print(f"ratio={results['medtune']['tokens_per_s'] / results['plain']['tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
