"""Answer-quality metrics, each against one or several references (the best reference counts).

Exact match and token F1 use SQuAD's normalisation: lower-case, drop punctuation and the articles
a/an/the, collapse whitespace. BLEU is sacrebleu's corpus BLEU (0-100); ROUGE is rouge-score's stemmed
F-measure (0-1), averaged over questions.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import sacrebleu
from rouge_score import rouge_scorer

METRICS = ("exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)


def normalise_answer(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    return float(any(normalise_answer(prediction) == normalise_answer(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    return max(_f1(normalise_answer(prediction).split(), normalise_answer(r).split()) for r in references)


def _f1(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    width = max(len(refs) for refs in references)
    # sacrebleu wants one stream per reference slot; repeating a question's first reference to fill its
    # empty slots changes neither clipped counts nor the closest reference length.
    streams = [[refs[i] if i < len(refs) else refs[0] for refs in references] for i in range(width)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def rouge(prediction: str, references: Sequence[str]) -> dict[str, float]:
    scores = _ROUGE.score_multi(list(references), prediction)
    return {name: s.fmeasure for name, s in scores.items()}


def per_example(prediction: str, references: Sequence[str]) -> dict[str, float]:
    return {"exact_match": exact_match(prediction, references), "token_f1": token_f1(prediction, references),
            **rouge(prediction, references)}


def score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[dict[str, float], list[dict]]:
    """Corpus metrics and the per-question scores behind them."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equal, non-zero numbers of predictions ({len(predictions)}) and references "
                         f"({len(references)})")
    rows = [per_example(p, refs) for p, refs in zip(predictions, references)]
    totals = {name: sum(r[name] for r in rows) / len(rows) for name in rows[0]}
    totals["bleu"] = corpus_bleu(predictions, references)
    totals["empty_rate"] = sum(not p.strip() for p in predictions) / len(predictions)
    totals["mean_answer_words"] = sum(len(p.split()) for p in predictions) / len(predictions)
    return {k: float(totals[k]) for k in (*METRICS, "empty_rate", "mean_answer_words")}, rows
