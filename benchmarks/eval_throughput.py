"""Answers per second: batched generation (left padding, KV cache) vs one question at a time.

    .venv/bin/python benchmarks/eval_throughput.py [--model DIR] [--n 32] [--batch-size 16] [--max-new-tokens 64]
    .venv/bin/python benchmarks/eval_throughput.py --closed-form [--n 32]

--closed-form instead compares the two ways to score closed-form (yes/no/maybe) questions: likelihood of
each choice (`eval.closed_form: likelihood`) against generate-and-parse (`generate`), both batched, and
prints each mode's answers/s, the unparseable share of the generated answers, and `ratio=<likelihood/generate>`.

Both passes run `medtune.evaluate.generate` with greedy decoding on the same questions from the sample
data; only the batch size differs. Also reports how many answers are identical between the two (greedy
answers can differ slightly under padding because float sums are taken in another order). The last line
is `ratio=<batched/single>`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from medtune import config as config_mod
from medtune import models
from medtune.evaluate import generate
from medtune.preprocess import render_prompt

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = Path("~/.cache/medtune/models/SmolLM2-135M-Instruct.Q4_1").expanduser()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="Local model directory (source=path).")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "sample" / "medqa_sample.jsonl")
    parser.add_argument("--n", type=int, default=32, help="Questions answered in each mode.")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--closed-form", action="store_true", help="Likelihood vs generate-and-parse scoring.")
    args = parser.parse_args()

    model_cfg = config_mod.ModelConfig(id=str(args.model), source="path")
    tokenizer = models.load_tokenizer(model_cfg, padding_side="left")
    model = models.load_model(model_cfg, config_mod.TrainConfig()).to(models.device())
    model.config.use_cache = True
    system = config_mod.PreprocessConfig().system_prompt
    questions = [json.loads(line)["question"] for line in args.data.read_text().splitlines() if line.strip()]
    prompts = [render_prompt(tokenizer, system, q) for q in questions[:args.n]]
    print(f"model {args.model.name}, device {models.device()}, torch threads {torch.get_num_threads()}, "
          f"{len(prompts)} questions, max_new_tokens {args.max_new_tokens}")

    generate(model, tokenizer, prompts[:2], batch_size=2, max_new_tokens=4, desc="warm-up")
    if args.closed_form:
        return closed_form(model, tokenizer, prompts, args)
    timings, answers = {}, {}
    for mode, batch_size in (("batched", args.batch_size), ("single", 1)):
        start = time.perf_counter()
        answers[mode] = generate(model, tokenizer, prompts, batch_size=batch_size,
                                 max_new_tokens=args.max_new_tokens, desc=mode)
        timings[mode] = time.perf_counter() - start
        words = sum(len(a.split()) for a in answers[mode])
        print(f"{mode:>8}: batch_size={batch_size:<3} {timings[mode]:7.1f} s  "
              f"{len(prompts) / timings[mode]:6.2f} answers/s  ({words} words generated)")
    same = sum(a == b for a, b in zip(answers["batched"], answers["single"]))
    print(f"identical answers batched vs single: {same}/{len(prompts)}")
    print(f"example: {questions[0]!r} -> {answers['batched'][0][:160]!r}")
    print(f"ratio={timings['single'] / timings['batched']:.2f}")


def closed_form(model, tokenizer, prompts: list[str], args) -> None:
    """Each question asked as yes/no/maybe: likelihood of the three labels vs generating and parsing."""
    from medtune import choices, metrics

    labels = metrics.YES_NO_MAYBE
    resolved = [choices.resolve("", "yes", None, labels) for _ in prompts]
    timings = {}
    start = time.perf_counter()
    ll = choices.loglikelihoods(model, tokenizer, prompts, resolved, batch_size=args.batch_size)
    timings["likelihood"] = time.perf_counter() - start
    start = time.perf_counter()
    generated = generate(model, tokenizer, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                         desc="generate")
    timings["generate"] = time.perf_counter() - start
    unparseable = sum(metrics.parse_choice(a, labels) is None for a in generated)
    for mode in ("likelihood", "generate"):
        print(f"{mode:>10}: {timings[mode]:7.1f} s  {len(prompts) / timings[mode]:7.2f} answers/s")
    print(f"unparseable generated answers: {unparseable}/{len(prompts)}; likelihood answers: "
          f"{sum(len(x) == len(labels) for x in ll)}/{len(prompts)} scored")
    print(f"ratio={timings['generate'] / timings['likelihood']:.2f}")


if __name__ == "__main__":
    main()
