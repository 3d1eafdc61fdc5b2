"""Score the base model, the candidate (base + adapter) and the champion on the same held-out questions; with a
preference stage also the SFT-only result the candidate was tuned from (`sft`), so what DPO added is measured.

All answer greedily with the recipe's `decoding` settings, except the champion, which answers as it was
gated and is served (the decoding stored with its version). The base model is loaded once; the candidate's
adapter is switched off for the base pass and the other adapters (SFT-only, the champion's: always of the profile's base model) are
loaded next to it, so the models differ in their adapters and nothing else. Rows that share a question are
scored as one question with several references (the best reference counts).

Each model also gets a perplexity on reference answers (answer tokens only, given the prompt; by default
on the validation split) so a broken model shows up even when its answers happen to overlap.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from medtune import choices as choice_mod
from medtune import decoding as decoding_mod
from medtune import metrics, models, phi, reuse
from medtune.config import Config, DecodingConfig
from medtune.metric_catalog import MODELS
from medtune.numeric import finite_values, jsonable

log = logging.getLogger(__name__)
# Questions per likelihood batch: prompt passes are compute-bound already at this size (MMLU on 2 CPU cores: 8
# and 16 within the noise), and each question's KV cache is copied once per choice.
LIKELIHOOD_BATCH = 16


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int, desc: str,
             decoding: DecodingConfig = DecodingConfig()) -> list[str]:
    """Greedy answers for rendered prompts (with the recipe's decoding), batched with left padding and the KV
    cache."""
    tokenizer.padding_side = "left"
    answers: list[str] = []
    # Sorting by length keeps padding (wasted compute) low; answers are put back in input order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    model.eval()
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
        idx = order[start:start + batch_size]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
        added = LogitsProcessorList(decoding_mod.processors(decoding, batch["input_ids"].shape[1]))
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                             logits_processor=added, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
        texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        answers += [t.strip() for t in texts]
    restored = [""] * len(prompts)
    for position, i in enumerate(order):
        restored[i] = answers[position]
    return restored


@torch.inference_mode()
def answer_nll(model, tokenizer, prompts: list[str], answers: list[str], batch_size: int = 4,
               max_tokens: int | None = None, eos: bool = True, desc: str = "perplexity"
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per row: summed negative log-likelihood of the answer tokens (+ EOS) given the prompt, and their count.

    Tokenised as training sees it: prompt and completion separately, then joined; padding on the right.
    eos=False scores the answer as a continuation that may go on (closed-form choices).
    """
    model.eval()
    nll, counts = np.zeros(len(prompts)), np.zeros(len(prompts), dtype=np.int64)
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        ids, labels = [], []
        for p, a in zip(prompts[start:start + batch_size], answers[start:start + batch_size]):
            p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
            a_ids = tokenizer(a + (tokenizer.eos_token if eos else ""), add_special_tokens=False)["input_ids"]
            seq, lab = p_ids + a_ids, [-100] * len(p_ids) + a_ids
            if max_tokens:
                seq, lab = seq[:max_tokens], lab[:max_tokens]
            ids.append(seq)
            labels.append(lab)
        width = max(len(s) for s in ids)
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in ids], device=model.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids], device=model.device)
        target = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels], device=model.device)
        logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        target = target[:, 1:]
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                   reduction="none")
        nll[start:start + len(ids)] = losses.sum(dim=1).cpu().numpy()
        counts[start:start + len(ids)] = (target != -100).sum(dim=1).cpu().numpy()
    return nll, counts


def perplexity_aggregator(nll: np.ndarray, counts: np.ndarray) -> metrics.Aggregator:
    """Token-weighted perplexity of a resample: exp(sum of NLL / number of answer tokens)."""
    def agg(idx: np.ndarray) -> np.ndarray:
        tokens = counts[idx].sum(axis=1)
        with np.errstate(over="ignore"):
            return np.where(tokens > 0, np.exp(nll[idx].sum(axis=1) / np.maximum(tokens, 1)), np.nan)
    return agg


def questions(rows: pd.DataFrame, max_rows: int | None = None) -> pd.DataFrame:
    """One row per distinct question (whitespace and case folded), with every reference answer it has."""
    df = rows.copy()
    for column in ("id", "focus", "qtype"):
        if column not in df:
            df[column] = None
    df["_key"] = [" ".join(str(q).split()).casefold() for q in df["question"]]
    grouped = []
    for _, group in df.groupby("_key", sort=False):
        first = group.iloc[0]
        refs = list(dict.fromkeys(str(a) for a in group["answer"]))
        grouped.append({"id": str(first["id"]), "question": first["question"], "references": refs,
                        "answer": refs[0], "focus": first["focus"], "qtype": first["qtype"],
                        "prompt": first.get("prompt"), "choices": first.get("choices")})
    out = pd.DataFrame(grouped)
    return out.head(max_rows) if max_rows else out


@dataclass
class ModelRun:
    answers: list[str]
    scored: metrics.Scored
    nll: np.ndarray | None = None
    counts: np.ndarray | None = None

    def values(self) -> dict[str, float]:
        values = dict(self.scored.values)
        if self.nll is not None:
            values["perplexity"] = float(perplexity_aggregator(self.nll, self.counts)(
                np.arange(len(self.nll))[None, :])[0])
        return values


@dataclass
class Evaluation:
    kind: str
    items: pd.DataFrame
    runs: dict[str, ModelRun]
    champion_info: dict = field(default_factory=dict)
    perplexity_split: str | None = None
    bootstrap: dict = field(default_factory=lambda: {"samples": 1000, "seed": 0, "confidence": 0.95})
    suites: dict[str, Evaluation] = field(default_factory=dict)
    scoring: str = "generate"
    decoding: dict = field(default_factory=dict)  # how base, candidate and SFT-only answered (DecodingConfig)
    reused: dict[str, list[str]] = field(default_factory=dict)  # model -> outputs taken from medtune.reuse

    @property
    def base(self) -> dict:
        return self.runs["base"].values()

    @property
    def candidate(self) -> dict | None:
        return self.runs["candidate"].values() if "candidate" in self.runs else None

    @property
    def champion(self) -> dict | None:
        """The champion's metrics; {} when a champion exists but could not be scored; None when none exists."""
        if "champion" in self.runs:
            return self.runs["champion"].values()
        return {} if self.champion_info.get("available") else None

    def intervals(self, first: str, second: str) -> dict[str, dict] | None:
        if first not in self.runs or second not in self.runs:
            return None
        a, b = self.runs[first], self.runs[second]
        extra = {}
        if a.nll is not None and b.nll is not None:
            extra["perplexity"] = (perplexity_aggregator(a.nll, a.counts), perplexity_aggregator(b.nll, b.counts),
                                   len(a.nll))
        return metrics.compare(a.scored, b.scored, len(self.items), extra=extra, **self.bootstrap)

    def comparison(self) -> dict:
        base, candidate = self.base, self.candidate
        # the SFT-only result: its scores and how the candidate (after DPO) and it compare with the others
        sft = {} if "sft" not in self.runs else {
            "sft": self.runs["sft"].values(),
            "ci": {"candidate_vs_sft": self.intervals("candidate", "sft"), "sft_vs_base": self.intervals("sft", "base"),
                   "sft_vs_champion": self.intervals("sft", "champion")}}
        return {
            "kind": self.kind,
            "n": int(len(self.items)),
            "n_references": int(sum(len(r) for r in self.items["references"])),
            "base": base,
            "candidate": candidate,
            "champion": self.champion,
            "champion_info": self.champion_info,
            "delta": None if candidate is None else {k: candidate[k] - base[k] for k in candidate if k in base},
            **({"sft": sft["sft"]} if sft else {}),
            "ci": {"candidate_vs_base": self.intervals("candidate", "base"),
                   "candidate_vs_champion": self.intervals("candidate", "champion"), **sft.get("ci", {})},
            "bootstrap": self.bootstrap,
            "perplexity_split": self.perplexity_split,
            "scoring": self.scoring,
            "decoding": self.decoding,
            **({"suites": {name: sub.comparison() for name, sub in self.suites.items()}} if self.suites else {}),
            **({"reused_outputs": self.reused} if self.reused else {}),
        }

    @property
    def predictions(self) -> pd.DataFrame:
        keep = ["id", "question", "references", "answer", "focus", "qtype"]
        out = self.items[keep].copy()
        for name, run in self.runs.items():
            out[f"{name}_answer"] = run.answers
            for metric in run.scored.rows[0]:
                if metric == "loglik":
                    continue
                out[f"{name}_{metric}"] = [r[metric] for r in run.scored.rows]
        return out


@dataclass
class ScoredSet:
    """One set to score with every model: its questions, kind, scoring and (closed form) choices."""

    name: str
    kind: str
    items: pd.DataFrame
    scoring: str = "generate"                 # generate | likelihood
    choices: list | None = None               # likelihood: choices.Choices per question
    shots: list[tuple[str, str]] = field(default_factory=list)
    labels: tuple[str, ...] | None = None     # generate-and-parse closed form: the label set


def closed_form_set(name: str, items: pd.DataFrame, scoring: str, column: str | None = "choices",
                    shots: list[tuple[str, str]] = (), origin: str = "") -> ScoredSet:
    """Resolve every question's choices (see medtune.choices); a bad row is an error naming it."""
    if scoring == "generate":
        return ScoredSet(name, "closed_form", items, "generate",
                         labels=metrics.closed_form_labels(items["references"].tolist()))
    has_column = column in items and items[column].notna().any()
    needs_set = not has_column and not all(choice_mod.lettered_options(q) for q in items["question"])
    set_labels = choice_mod.dataset_labels(items["answer"]) if needs_set else None
    resolved = []
    for pos, row in enumerate(items.itertuples(index=False)):
        value = getattr(row, column) if has_column else None
        try:
            resolved.append(choice_mod.resolve(row.question, row.answer, value, set_labels))
        except choice_mod.ChoiceError as exc:
            raise choice_mod.ChoiceError(f"{origin or name}: row {pos + 1} (id {row.id}), field 'answer': {exc}") \
                from None
    return ScoredSet(name, "closed_form", items, "likelihood", choices=resolved, shots=list(shots))


def score(cfg: Config, answers: list[str], spec: ScoredSet) -> metrics.Scored:
    refs = spec.items["references"].tolist()
    common = dict(ngram=cfg.eval.repetition_ngram, threshold=cfg.eval.repetition_threshold)
    if spec.kind == "closed_form":
        return metrics.score_closed_form(answers, refs, spec.items["question"].tolist(), spec.labels, **common)
    return metrics.score_free_text(answers, refs, **common)


def answer_set(cfg: Config, spec: ScoredSet, model, tokenizer, name: str, prompts: list[str] | None = None,
               outputs: reuse.Outputs | None = None) -> ModelRun:
    """One model's answers and scores on one set (generation, or likelihood of each choice); the model's
    outputs come from `outputs` where this model computed them before (medtune.reuse)."""
    outputs = outputs or reuse.Outputs(None, {})
    if prompts is None:
        prompts = [choice_mod.render(tokenizer, cfg.preprocess.system_prompt, q, spec.shots)
                   for q in spec.items["question"]]
    if spec.scoring == "likelihood":
        batch = min(cfg.eval.batch_size, LIKELIHOOD_BATCH)
        texts = [c.texts for c in spec.choices]
        ll = [np.asarray(row) for row in outputs.get(
            f"loglikelihoods:{spec.name}", {"prompts": prompts, "choices": texts, "batch_size": batch},
            lambda: [row.tolist() for row in choice_mod.loglikelihoods(
                model, tokenizer, prompts, spec.choices, batch_size=batch, desc=f"{name} on {spec.name}")])]
        scored = metrics.score_choices(ll, [[len(t) for t in c.texts] for c in spec.choices],
                                       [c.gold for c in spec.choices], [c.labels for c in spec.choices])
        return ModelRun(answers=[r["parsed"] for r in scored.rows], scored=scored)
    settings = {"prompts": prompts, "batch_size": cfg.eval.batch_size, "max_new_tokens": cfg.eval.max_new_tokens,
                "decoding": cfg.decoding.model_dump()}
    # kept as the answer files are written: masked (the own split is masked already; a suite is not)
    answers = outputs.get(f"generate:{spec.name}", settings, lambda: [phi.mask(a) for a in generate(
        model, tokenizer, prompts, batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
        desc=f"{name} on {spec.name}", decoding=cfg.decoding)])
    return ModelRun(answers=answers, scored=score(cfg, answers, spec))


def own_split_set(cfg: Config, items: pd.DataFrame) -> ScoredSet:
    if cfg.data.kind == "closed_form":
        return closed_form_set("test", items, cfg.eval.closed_form, origin="test split")
    return ScoredSet("test", "free_text", items)


def evaluate(cfg: Config, test_rows: pd.DataFrame, adapter_dir: Path | None,
             perplexity_rows: pd.DataFrame | None = None, champion=None, champion_info: dict | None = None,
             perplexity_split: str = "validation", suites: list[ScoredSet] = (), sft_dir: Path | None = None
             ) -> Evaluation:
    """Answer and score `test_rows` and every suite with the base model, the candidate (if an adapter is
    given), the SFT-only result it was preference-tuned from (`sft_dir`, if given) and the champion (if one is
    given); perplexity on `perplexity_rows` (default: the test rows' references)."""
    from medtune.preprocess import render_prompt

    items = questions(test_rows, cfg.eval.max_rows)
    if items.empty:
        raise ValueError("the test split is empty: add data or raise preprocess.test_fraction")
    own = own_split_set(cfg, items)
    tokenizer = models.load_tokenizer(cfg.model, padding_side="left")
    if items["prompt"].isna().any():
        items["prompt"] = [render_prompt(tokenizer, cfg.preprocess.system_prompt, q) for q in items["question"]]
    if perplexity_rows is None or perplexity_rows.empty:
        perplexity_rows, perplexity_split = items, "test"
    ppl_prompts = perplexity_rows["prompt"].tolist() if "prompt" in perplexity_rows and \
        perplexity_rows["prompt"].notna().all() else \
        [render_prompt(tokenizer, cfg.preprocess.system_prompt, q) for q in perplexity_rows["question"]]
    ppl_answers = perplexity_rows["answer"].astype(str).tolist()
    champion_info = dict(champion_info or {"available": False, "reason": "champion comparison not requested"})

    trained = {name: Path(path) for name, path in (("candidate", adapter_dir), ("sft", sft_dir)) if path is not None}
    base_identity = reuse.weights_identity(cfg) if reuse.store_dir(cfg) else {}
    weights = {"base model": None, **trained, "champion": champion.adapter_dir if champion else None}
    reused: dict[str, list[str]] = {}

    def run(name: str, m, tok, model_prompts, model_ppl_prompts) -> dict[str, ModelRun]:
        # the champion answers as it is served (its own decoding); the others with this recipe's
        c = cfg.model_copy(update={"decoding": champion.decoding}) if name == "champion" else cfg
        outputs = reuse.Outputs.of(cfg, {**base_identity, "trained": weights[name] and reuse.files_digest(
            weights[name])}) if base_identity else reuse.Outputs(None, {})
        own_run = answer_set(c, own, m, tok, name, model_prompts, outputs)
        ppl = {"prompts": model_ppl_prompts, "answers": ppl_answers, "batch_size": min(4, cfg.eval.batch_size),
               "max_tokens": cfg.preprocess.max_tokens}
        nll, counts = outputs.get("answer_nll:test", ppl, lambda: [a.tolist() for a in answer_nll(
            m, tok, model_ppl_prompts, ppl_answers, batch_size=ppl["batch_size"], max_tokens=ppl["max_tokens"],
            desc=f"{name} perplexity")])
        own_run.nll, own_run.counts = np.asarray(nll), np.asarray(counts)
        sets = {"test": own_run, **{spec.name: answer_set(c, spec, m, tok, name, outputs=outputs) for spec in suites}}
        if outputs.reused:
            reused["base" if name == "base model" else name] = outputs.reused
            log.info("%s: reused outputs computed before with the same weights, inputs and code: %s", name,
                     ", ".join(outputs.reused))
        return sets

    # One model in memory at a time, each loaded as it is served (models.load_trained: an adapter on float32
    # weights folded into them). The champion is an adapter of the profile's base model or a full model.
    prompts = items["prompt"].tolist()
    runs = {"base": run("base model", models.load_model(cfg.model, cfg.train).to(models.device()), tokenizer,
                        prompts, ppl_prompts)}
    for name, path in trained.items():
        runs[name] = run(name, models.load_trained(cfg.model, cfg.train, path), tokenizer, prompts, ppl_prompts)
    if champion is not None and models.is_adapter_dir(champion.adapter_dir):
        runs["champion"] = run("champion", models.load_trained(cfg.model, cfg.train, champion.adapter_dir),
                               tokenizer, prompts, ppl_prompts)
    elif champion is not None:
        runs_champion = _separate_champion(cfg, champion, items, perplexity_rows, run)
        if runs_champion is None:
            champion_info["reason"] = f"champion {champion.name} version {champion.version} could not be loaded"
        else:
            runs["champion"] = runs_champion
    if champion is not None and "champion" in runs:
        champion_info["scored"] = True
    bootstrap = {"samples": cfg.eval.bootstrap_samples, "seed": cfg.eval.seed, "confidence": cfg.eval.confidence}

    def result(spec: ScoredSet, **extra) -> Evaluation:
        return Evaluation(kind=spec.kind, items=spec.items, runs={m: runs[m][spec.name] for m in MODELS if m in runs},
                          champion_info=champion_info, bootstrap=bootstrap, scoring=spec.scoring,
                          decoding=cfg.decoding.model_dump(), **extra)

    return result(own, perplexity_split=perplexity_split, suites={spec.name: result(spec) for spec in suites},
                  reused=reused)


def _separate_champion(cfg: Config, champion, items: pd.DataFrame, perplexity_rows: pd.DataFrame, run):
    """A fully fine-tuned champion (train.method full), prompted with the profile's base model's tokenizer."""
    from medtune.preprocess import render_prompt

    try:
        tokenizer = models.load_tokenizer(cfg.model, padding_side="left")
        model = models.load_trained(cfg.model, cfg.train, champion.adapter_dir)
    except (OSError, ValueError) as exc:
        log.warning("champion %s version %s could not be loaded: %s", champion.name, champion.version, exc)
        return None
    model.config.use_cache = True
    prompts = [render_prompt(tokenizer, cfg.preprocess.system_prompt, q) for q in items["question"]]
    ppl_prompts = [render_prompt(tokenizer, cfg.preprocess.system_prompt, q) for q in perplexity_rows["question"]]
    return run("champion", model, tokenizer, prompts, ppl_prompts)


def write_outputs(result: Evaluation, comparison_path: Path, predictions_dir: Path) -> dict:
    """comparison.json (NaN written as null, which the gate treats as missing), predictions.jsonl (the own split)
    and one <suite>.jsonl per suite: every model's answer and per-question scores, so a suite's verdict can be
    read question by question."""
    comparison = jsonable(result.comparison())
    comparison_path.parent.mkdir(parents=True, exist_ok=True)
    comparison_path.write_text(json.dumps(comparison, indent=2))
    predictions_dir.mkdir(parents=True, exist_ok=True)
    result.predictions.to_json(predictions_dir / "predictions.jsonl", orient="records", lines=True, force_ascii=False)
    for name, suite in result.suites.items():
        # A suite is read here, not through the data contract that masks the split's personal data, and these
        # files go to MLflow: mask them on the way out.
        suite.predictions.map(_masked).to_json(predictions_dir / f"{name}.jsonl", orient="records", lines=True,
                                               force_ascii=False)
    return comparison


def _masked(value):
    if isinstance(value, str):
        return phi.mask(value)
    if isinstance(value, list):
        return [_masked(v) for v in value]
    return value


def flat_metrics(comparison: dict, prefix: str = "") -> dict[str, float]:
    """Every finite value of a comparison as MLflow metric names: <model>.<metric>, ci.<pair>.<metric>.<bound>,
    and the same under suite.<name>. for each suite."""
    out = {}
    for name in MODELS:
        out.update({f"{prefix}{name}.{k}": v for k, v in finite_values(comparison.get(name)).items()})
    for pair, intervals in (comparison.get("ci") or {}).items():
        for metric, ci in (intervals or {}).items():
            out.update({f"{prefix}ci.{pair}.{metric}.{k}": v for k, v in finite_values(ci).items()
                        if k in ("delta", "low", "high")})
    for suite, scored in (comparison.get("suites") or {}).items():
        out.update(flat_metrics(scored, f"{prefix}suite.{suite}."))
    return out
