"""Training throughput: medtune's train step vs plain TRL set up the way a user would on this hardware.

Rows (each run in its own process, so peak memory is per run):
- `medtune`: the train step with the profile's settings (configs/local.yaml on CPU).
- `trl-fair`: a plain TRL `SFTTrainer` script with TRL's defaults plus what the hardware needs: `bf16` only where
  it is native (AVX512-BF16/AMX CPUs, CUDA), else `bf16=False`. This is the baseline `ratio=` is against.
- `trl-defaults`: the same script with TRL's defaults untouched (bf16 autocast even where it is emulated). Where
  that is the same as `trl-fair` it is not run twice.
- with `--ablations`: medtune with one choice switched (padding layout, LoRA dropout, torch.compile, TRL's LM
  head; on CUDA also QLoRA NF4 and Liger kernels), to see what each choice is worth.

Same model, data (the profile's train split as preprocess makes it), batch size and token budget for every row.
The first `--warmup` optimizer steps are not timed (their time is reported separately: for torch.compile it is
the compile time); tokens/s is the non-padding tokens of the `--steps` timed steps over their total time
(medtune.throughput.StepClock, the same clock for every row). `--reps` repetitions run the rows alternately
(ABCABC...), so a change in machine load hits every row alike; the median and spread are reported.

MFU: useful FLOPs (4 per frozen weight per token, 4 per LM-head weight per answer token: the same formula for
every row) over the device peak. On CPU the peak is measured here, once per repetition: the matmul rate
(forward and input-gradient) at the model's own Linear shapes and tokens per step, in the training dtype. On
CUDA it is the GPU's dense bf16 peak from medtune.throughput.GPU_PEAK_TFLOPS (the measured rate is recorded too).

On CUDA the model is Qwen2.5-0.5B-shaped with random weights (its config written below: the Hub is not needed).

    .venv/bin/python benchmarks/train_throughput.py [--quick] [--ablations] [--json PATH]
    .venv/bin/python benchmarks/render_results.py    # RESULTS.md's training section from the JSON

The last two lines are `ratio=<medtune median / trl-fair median tokens/s>` and `mfu=<medtune's MFU>`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "configs" / "local.yaml"
RESULTS_DIR = ROOT / "benchmarks" / "results"

# Qwen2.5-0.5B's config.json (Qwen/Qwen2.5-0.5B), for random weights of the real shape where the Hub is unreachable.
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
                  rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu", bos_token_id=151643,
                  eos_token_id=151643)

BASELINES = ("medtune", "trl-fair", "trl-defaults")


def variants(device: str, native_bf16: bool, profile_train) -> dict[str, dict]:
    """name -> {what, runner (medtune|trl), train (train.* overrides), args (SFTConfig attributes)}."""
    from medtune.train import padding_free

    layout = ("padding-free", {"padding_free": True}) if not padding_free(profile_train) else \
        ("padded+grouped", {"padding_free": False})
    dropout = 0.05 if profile_train.lora.dropout == 0 else 0.0
    rows = {
        "medtune": dict(what="medtune train step (profile settings)", runner="medtune"),
        "trl-fair": dict(what="TRL SFTTrainer: defaults, bf16 only where native", runner="trl",
                         args={"bf16": native_bf16}),
        "trl-defaults": dict(what="TRL SFTTrainer: library defaults", runner="trl"),
        f"medtune+{layout[0]}": dict(what=f"medtune, {layout[0]} batches", runner="medtune", train=layout[1]),
        f"medtune+dropout{dropout:g}": dict(what=f"medtune, LoRA dropout {dropout:g}", runner="medtune",
                                            train={"lora": {"dropout": dropout}}),
        "medtune+compile": dict(what="medtune, torch.compile (inductor) of the decoder stack", runner="medtune",
                                compile=True),
    }
    if device == "cuda":
        rows |= {
            "medtune+qlora": dict(what="medtune, QLoRA NF4 (bf16 compute)", runner="medtune",
                                  train={"method": "qlora"}),
            "medtune+liger": dict(what="medtune, Liger kernels (use_liger_kernel)", runner="medtune",
                                  args={"use_liger_kernel": True}),
            "trl-fair+liger": dict(what="TRL SFTTrainer: defaults + Liger kernels", runner="trl",
                                   args={"use_liger_kernel": True}),
        }
    else:  # on CUDA medtune already uses TRL's fused head (it scores only answer tokens there)
        rows["medtune+trl_head"] = dict(what="medtune, TRL's LM head (every position on CPU)", runner="medtune",
                                        trl_head=True)
    return rows


def run_order(names: list[str], reps: int) -> list[tuple[int, str]]:
    """Alternating repetitions: every row once per round, so slow drift in load spreads over all rows."""
    return [(rep, name) for rep in range(reps) for name in names]


def profile_config(device: str, model_dir: str | None = None, profile: Path = PROFILE):
    """The profile (configs/local.yaml); on CUDA pointed at the random Qwen2.5-0.5B-shaped model in bf16."""
    from medtune import config as config_mod

    cfg = config_mod.load(profile)
    if device == "cuda":
        model = cfg.model.model_copy(update={"id": model_dir, "source": "path"})
        train = cfg.train.model_copy(update={"dtype": "bfloat16", "quantization": cfg.train.quantization.model_copy(
            update={"compute_dtype": "bfloat16"})})
        cfg = cfg.model_copy(update={"model": model, "train": train})
    return cfg


def qwen_shaped_model(out_dir: Path, tokenizer) -> Path:
    """Random-weight Qwen2.5-0.5B (494M parameters), saved in bf16 with the profile's tokenizer (its ids fit)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_05B, dtype="bfloat16")
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _with_overrides(cfg, train: dict, steps: int):
    train = {**train, "max_steps": steps, "checkpoint_steps": 0, "logging_steps": 10_000}
    if "lora" in train:
        train["lora"] = cfg.train.lora.model_copy(update=train["lora"])
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})


def _data(cfg, prepared: str | None = None):
    """The profile's training split; from `prepared` (written by --write-prepared) on a machine that lacks the
    data-validation stack (great-expectations), such as a bare GPU machine."""
    import pandas as pd

    from medtune import models
    from medtune import preprocess as prep

    tokenizer = models.load_tokenizer(cfg.model)
    if prepared:
        return pd.read_json(prepared, orient="records", lines=True), tokenizer
    rows = pd.read_json(ROOT / cfg.data.path, orient="records", lines=True)
    return prep.prepare(rows, tokenizer, cfg.preprocess).splits["train"], tokenizer


def _count_tokens(trainer, clock) -> None:
    """Feed the clock every row's non-padding and answer tokens, the same way for TRL and medtune."""
    inner = trainer.training_step

    def training_step(model, inputs, *args, **kwargs):
        mask, labels = inputs.get("attention_mask"), inputs["labels"]
        tokens = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        clock.add(tokens, int((labels[:, 1:] != -100).sum()))
        return inner(model, inputs, *args, **kwargs)

    trainer.training_step = training_step


def run_variant(spec: dict) -> dict:
    """One row, one repetition, in this process: build the trainer, train warmup + steps, report."""
    import torch

    from medtune import models, throughput
    from medtune import train as medtune_train

    device = spec["device"]
    cfg = profile_config(device, spec.get("model_dir"), Path(spec.get("profile", PROFILE)))
    row = variants(device, spec["native_bf16"], cfg.train)[spec["name"]]
    cfg = _with_overrides(cfg, row.get("train", {}), spec["warmup"] + spec["steps"])
    rows, tokenizer = _data(cfg, spec.get("prepared"))
    out = Path(tempfile.mkdtemp(prefix=f"bench-{spec['name']}-"))
    if row["runner"] == "trl":
        trainer = _trl_trainer(cfg, rows, tokenizer, out, row.get("args", {}))
    else:
        extra = row.get("args", {})
        if extra:  # SFTConfig attributes medtune's profile has no field for (compile, Liger)
            make = medtune_train.sft_config
            medtune_train.sft_config = lambda *a, **k: _set(make(*a, **k), extra)
        if row.get("trl_head"):
            from trl import SFTTrainer

            medtune_train.MedtuneTrainer.compute_loss = SFTTrainer.compute_loss
        trainer = medtune_train.build_trainer(cfg, rows, rows.head(0), out, tokenizer=tokenizer)
        if row.get("compile"):
            # medtune's loss calls the decoder stack directly (the LM head runs on answer tokens only), past the
            # wrapper the Trainer's torch_compile would put around the whole model: compile that stack itself
            causal_lm = throughput.causal_lm(trainer.model)
            causal_lm.model = torch.compile(causal_lm.model, backend="inductor")
    clock = throughput.StepClock(warmup=spec["warmup"])
    trainer.add_callback(clock)
    _count_tokens(trainer, clock)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    body, head = throughput.matmul_params(trainer.model)
    model = throughput.causal_lm(trainer.model)
    return {"name": spec["name"], "rep": spec["rep"], "tokens": clock.tokens, "labelled": clock.labelled,
            "seconds": clock.seconds, "warmup_seconds": clock.warmup_seconds,
            "tokens_per_s": clock.tokens_per_s, "useful_flops_per_s": clock.flops_per_s(4 * body, 4 * head),
            "peak_memory_mb": medtune_train.peak_memory_mb(),
            "settings": {"bf16_autocast": trainer.args.bf16, "dtype": str(next(model.parameters()).dtype),
                         "activation_checkpointing": trainer.args.activation_checkpointing,
                         "padding_free": trainer.args.padding_free,
                         "sampling": trainer.args.train_sampling_strategy,
                         "lora_dropout": cfg.train.lora.dropout, "method": cfg.train.method,
                         "torch_compile": trainer.args.torch_compile or bool(row.get("compile")),
                         "use_liger_kernel": trainer.args.use_liger_kernel,
                         "batch_size": cfg.train.batch_size, "max_tokens": cfg.preprocess.max_tokens,
                         "torch_threads": torch.get_num_threads()}}


def _set(obj, attrs: dict):
    for key, value in attrs.items():
        setattr(obj, key, value)
    return obj


def _trl_trainer(cfg, rows, tokenizer, out: Path, args: dict):
    """A plain TRL script: the model path, the prompt/completion rows, LoRA on the same modules, TRL defaults."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from medtune import models

    lora = cfg.train.lora
    sft = SFTConfig(output_dir=str(out), per_device_train_batch_size=cfg.train.batch_size,
                    max_length=cfg.preprocess.max_tokens, max_steps=cfg.train.max_steps, report_to="none",
                    save_strategy="no", seed=cfg.train.seed, disable_tqdm=True, logging_steps=10_000,
                    use_cpu=not torch.cuda.is_available(),  # TRL refuses to start on CPU without it
                    **args)
    return SFTTrainer(
        model=models.resolve(cfg.model), args=sft, processing_class=tokenizer,
        train_dataset=Dataset.from_pandas(rows[["prompt", "completion"]], preserve_index=False),
        peft_config=LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                               target_modules=lora.target_modules, task_type="CAUSAL_LM"))


# ---------------------------------------------------------------------------------------------- the parent


def context(device: str, native_bf16: bool) -> dict:
    import peft
    import torch
    import transformers
    import trl

    flags = Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split() \
        if Path("/proc/cpuinfo").exists() else []
    info = {"cpu": _cpu_name(), "cpus": os.cpu_count(), "native_bf16": native_bf16,
            "cpu_bf16_flags": sorted(f for f in flags if "bf16" in f or "amx" in f or f == "avx512f"),
            "torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "peft": peft.__version__, "python": platform.python_version(),
            "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "load_avg_start": os.getloadavg(),
            "git": _git_sha()}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _git_sha() -> str | None:
    proc = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=ROOT, capture_output=True,
                          text=True)  # -dirty: measured code that no commit holds
    return proc.stdout.strip() or None


def measure_peak(cfg, device: str, tokens: int) -> float:
    """The matmul rate at the model's Linear shapes (body and LM head) and `tokens` rows, training dtype."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from medtune import models, throughput

    with torch.device("meta"):  # shapes only
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(models.resolve(cfg.model)))
    body, (d, vocab) = throughput.linear_shapes(model)
    return throughput.measure_matmul_peak(body + Counter({(d, vocab): 1}), tokens, models.compute_dtype(cfg.train),
                                          device)


def summarize(results: list[dict], peaks: list[float], gpu_peak: float | None) -> dict:
    """Per row: median/min/max/spread of tokens/s, MFU of the median against the median measured peak (and
    the GPU table's peak where there is one), warm-up seconds, peak memory."""
    from medtune.throughput import spread

    peak = spread(peaks)["median"]
    rows = {}
    for name in dict.fromkeys(r["name"] for r in results):
        runs = [r for r in results if r["name"] == name]
        rate = spread([r["tokens_per_s"] for r in runs])
        flops = spread([r["useful_flops_per_s"] for r in runs])["median"]
        rows[name] = {"tokens_per_s": rate, "mfu_measured_peak": flops / peak,
                      "mfu": flops / (gpu_peak or peak), "useful_gflops_per_s": flops / 1e9,
                      "warmup_seconds": spread([r["warmup_seconds"] for r in runs])["median"],
                      "peak_memory_mb": max(r["peak_memory_mb"] for r in runs),
                      "tokens_per_run": runs[0]["tokens"], "settings": runs[0]["settings"]}
    return rows


def build_report(meta: dict, results: list[dict], peaks: list[float], loads: list[float], planned: int) -> dict:
    from medtune import throughput

    gpu_peak = throughput.gpu_peak_flops(meta["gpu"]) if meta["device"] == "cuda" else None
    rows = summarize(results, peaks, gpu_peak)
    context = {**meta, "load_avg_during": throughput.spread(loads), "load_avg_end": os.getloadavg(),
               "matmul_peak_gflops": throughput.spread([p / 1e9 for p in peaks]),
               "gpu_dense_bf16_peak_tflops": gpu_peak / 1e12 if gpu_peak else None,
               "runs_done": len(results), "runs_planned": planned}
    ratio = rows["medtune"]["tokens_per_s"]["median"] / rows["trl-fair"]["tokens_per_s"]["median"] \
        if {"medtune", "trl-fair"} <= set(rows) else None
    return {"context": context, "rows": rows, "runs": results, "ratio": ratio}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    parser.add_argument("--reps", type=int, default=3, help="alternating repetitions of every row")
    parser.add_argument("--defaults-steps", type=int, default=2,
                        help="timed steps for trl-defaults where its bf16 is emulated (~minutes per step)")
    parser.add_argument("--quick", action="store_true", help="development: 3 steps, 1 warm-up, 1 repetition")
    parser.add_argument("--ablations", action="store_true", help="also the one-choice-switched medtune rows")
    parser.add_argument("--only", nargs="+", help="run just these rows")
    parser.add_argument("--profile", type=Path, default=PROFILE, help="the medtune profile every row follows")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda where available")
    parser.add_argument("--json", type=Path, help=f"where to write results (default {RESULTS_DIR}/"
                                                  "train_throughput_<device>.json; --quick: not written)")
    parser.add_argument("--prepared", help="the training split as --write-prepared wrote it (skips preprocessing)")
    parser.add_argument("--write-prepared", type=Path, help="write the profile's training split there and exit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_variant(json.loads(args.child))), flush=True)
        return
    if args.quick:
        args.steps, args.warmup, args.reps, args.defaults_steps = 3, 1, 1, 1

    import torch

    from medtune import models, throughput

    if args.write_prepared:
        rows, _ = _data(profile_config("cpu", profile=args.profile))
        rows.to_json(args.write_prepared, orient="records", lines=True)
        return print(f"# wrote {len(rows)} training rows to {args.write_prepared}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    native = models.native_bf16(torch.device(device))
    model_dir = None
    if device == "cuda":
        base = profile_config("cpu", profile=args.profile)
        model_dir = str(qwen_shaped_model(Path(tempfile.mkdtemp(prefix="qwen05b-")), models.load_tokenizer(base.model)))
    cfg = profile_config(device, model_dir, args.profile)
    table = variants(device, native, cfg.train)
    names = args.only or [n for n in table if n in BASELINES or args.ablations]
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown rows {unknown}; this device has {list(table)}")
    if native and "trl-defaults" in names:  # TRL's default bf16 is native here: the same script as trl-fair
        names.remove("trl-defaults")
    rows, _ = _data(cfg, args.prepared)
    tokens_per_step = int(rows["n_tokens"].mean() * cfg.train.batch_size) if "n_tokens" in rows else \
        cfg.train.batch_size * cfg.preprocess.max_tokens // 2
    meta = {**context(device, native), "device": device, "args": {k: str(v) for k, v in vars(args).items()},
            "model": cfg.model.id if device == "cpu" else "Qwen2.5-0.5B-shaped, random weights",
            "tokens_per_step_probe": tokens_per_step}
    print(f"# {meta['cpu']} x{meta['cpus']}{' + ' + meta['gpu'] if 'gpu' in meta else ''}, native bf16 "
          f"{native}, torch {meta['torch']}, transformers {meta['transformers']}, trl {meta['trl']}; load avg "
          f"{meta['load_avg_start'][0]:.1f}", flush=True)

    results, peaks, loads = [], [], []
    out = args.json or (None if args.quick else RESULTS_DIR / f"train_throughput_{device}.json")
    order = [(rep, n) for rep, n in run_order(names, args.reps) if not (n == "trl-defaults" and not native and rep)]
    planned = len(order)
    for rep, name in order:
        if name == names[0]:
            peaks.append(measure_peak(cfg, device, tokens_per_step))
            print(f"rep {rep}: matmul peak at the model's shapes {peaks[-1] / 1e9:.1f} GFLOP/s", flush=True)
        emulated_defaults = name == "trl-defaults" and not native  # minutes per step: one short repetition
        spec = {"name": name, "rep": rep, "device": device, "native_bf16": native, "model_dir": model_dir,
                "profile": str(args.profile), "prepared": args.prepared,
                "warmup": 1 if emulated_defaults else args.warmup,
                "steps": args.defaults_steps if emulated_defaults else args.steps}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore", "TQDM_DISABLE": "1"})
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        results.append({**json.loads(line.removeprefix("RESULT ")), "timed_steps": spec["steps"]})
        loads.append(os.getloadavg()[0])
        r = results[-1]
        print(f"rep {rep} {name:24s} {r['tokens_per_s']:8.1f} tokens/s  warm-up {r['warmup_seconds']:6.1f} s  "
              f"peak mem {r['peak_memory_mb']:6.0f} MB  ({r['tokens']} tokens / {r['seconds']:.1f} s, "
              f"{spec['steps']} steps)", flush=True)

        report = build_report(meta, results, peaks, loads, planned)
        if out:  # after every run, so an interrupted benchmark still leaves what it measured
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report, indent=1) + "\n")

    summary, ratio = report["rows"], report["ratio"]
    for name, s in summary.items():
        t = s["tokens_per_s"]
        print(f"{name:24s} median {t['median']:8.1f} tokens/s (min {t['min']:.1f}, max {t['max']:.1f}, n={t['n']})"
              f"  MFU {s['mfu']:.1%}  {table[name]['what']}")
    if out:
        print(f"# wrote {out}")
    if ratio is not None:
        print(f"ratio={ratio:.2f}")
    if "medtune" in summary:
        print(f"mfu={summary['medtune']['mfu']:.3f}")


if __name__ == "__main__":
    main()
