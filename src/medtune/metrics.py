"""Answer-quality metrics, quality checks and paired bootstrap confidence intervals.

Free-text answers (each scored against one or several references; the best reference counts):

* exact_match, token_f1: SQuAD's normalisation — lower-case, drop ASCII punctuation, drop the articles
  a/an/the, collapse whitespace — then string equality / bag-of-tokens F1 (0-1).
* bleu: sacrebleu's corpus BLEU (0-100, default 13a tokenizer and `exp` smoothing), all references of a
  question used together.
* rouge1, rouge2, rougeL: rouge-score F-measure with the Porter stemmer (0-1), best reference per
  question, averaged over questions.

Closed-form answers (yes/no/maybe, or lettered multiple choice):

* The answer is parsed into a label (see `parse_choice`); an answer that names no label is
  *unparseable*: it counts as wrong and its rate is reported as `unparseable_rate`.
* accuracy: share of questions whose parsed label equals the reference label.
* macro_f1: unweighted mean of per-class F1 over the classes that occur among the reference labels or
  the parsed answers (unparseable answers add no class but lower the recall of the true class).
* By likelihood (`score_choices`, the default; see medtune.choices): the prediction is the choice with the
  highest log-likelihood (accuracy, macro_f1) or the highest log-likelihood per character (accuracy_norm).

Names, directions and kinds of all metrics are in medtune.metric_catalog.

Quality checks (catch a broken model rather than measure a good one):

* empty_rate: share of answers that are empty after stripping whitespace.
* repetition_rate: share of answers that are degenerate: at least `threshold` of their word n-grams
  repeat an earlier n-gram of the same answer (see `repeated_ngram_fraction`).
* answer_words_mean/p10/p50/p90, reference_words_mean and length_ratio (total answer words / total
  reference words; the first reference of each question): the length distribution against references.
* perplexity: exp of the mean per-token negative log-likelihood of the reference answers (answer tokens
  only, given the prompt), computed in `medtune.evaluate`.

Every metric that can be resampled is built from per-question statistics by an *aggregator* that takes
a matrix of row indices (one resample per row) and returns one value per resample. The reported value is
the aggregator applied to all rows, so the bootstrap recomputes exactly the reported statistic.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)
_ROUGE = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
_BLEU = BLEU()  # sacrebleu defaults: 13a tokenizer, exp smoothing, corpus-level

Aggregator = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------------------------- free text

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


def bleu_stats(prediction: str, references: Sequence[str]) -> list[int]:
    """sacrebleu's sufficient statistics for one question: [hyp_len, ref_len, correct 1-4, total 1-4]."""
    s = _BLEU.corpus_score([prediction], [[r] for r in references])
    return [s.sys_len, s.ref_len, *s.counts, *s.totals]


def bleu_from_stats(stats: np.ndarray) -> float:
    """Corpus BLEU from summed statistics, computed the way sacrebleu's corpus_bleu computes it."""
    stats = [int(x) for x in stats]
    return float(BLEU.compute_bleu(stats[2:6], stats[6:10], stats[0], stats[1], smooth_method="exp").score)


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu corpus BLEU with a variable number of references per question."""
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


# -------------------------------------------------------------------------------------------- closed form

YES_NO_MAYBE = ("yes", "no", "maybe")
LETTERS = tuple("abcdefghij")
_OPTION = re.compile(r"(?:^|\s)\(?([A-J])[\).:]\s+(.+?)(?=\s+\(?[A-J][\).:]\s|\n|$)")
_KEYWORD = r"\b(?i:final answer|answer|option)\s*(?i:is|:|-)?\s*"
# A word label may follow the keyword or lead the answer ("Yes, ...").
_DECLARED_WORD = re.compile(_KEYWORD + r"\(?([A-Za-z]+)\b")
_LEADING_WORD = re.compile(r"^\W*([A-Za-z]+)\b")
# A letter must be delimited ("B)", "(b)", "C.", "D" alone, or a capital after "answer is"), so the
# article in "A patient should..." or "the answer is a common condition" is not read as option A.
_DELIMITED = r"(?:\(([A-Ja-j])\)|([A-Ja-j])(?=[\).:\],;]|\s*$))"
_DECLARED_LETTER = re.compile(_KEYWORD + r"(?:" + _DELIMITED + r"|([A-J])\b)")
_LEADING_LETTER = re.compile(r"^[^\w(]*" + _DELIMITED)


def options_from_question(question: str) -> dict[str, str]:
    """Lettered options written in a question ("A) aspirin B) ..." or one per line), letter -> text.

    Only a run of options starting at A counts, so a stray "vitamin D. It..." is not an option list.
    """
    return option_run(question, lambda letter: letter.lower(), normalise_answer)


def option_run(question: str, key: Callable[[str], str], text: Callable[[str], str]) -> dict[str, str]:
    """The options written in `question` as key(letter) -> text(option), if they run from A (2 or more)."""
    found: dict[str, str] = {}
    for m in _OPTION.finditer(question):
        found.setdefault(key(m.group(1)), text(m.group(2)))
    run = {}
    for letter in LETTERS:
        if key(letter.upper()) not in found:
            break
        run[key(letter.upper())] = found[key(letter.upper())]
    return run if len(run) >= 2 else {}


def _first(match: re.Match | None) -> str | None:
    if match is None:
        return None
    return next((g.lower() for g in match.groups() if g), None)


def parse_choice(text: str, labels: Sequence[str], options: dict[str, str] | None = None) -> str | None:
    """The label an answer commits to, or None when it commits to none.

    In order: an explicit "answer is X" / "answer: X"; a leading label ("Yes, ...", "B) ...", "(c)");
    for multiple choice, an answer that is (or starts with) exactly one option's text. Anything else is
    unparseable; an answer is never guessed from a label word buried in the text ("there is no cure").
    """
    text = text.strip()
    if not text:
        return None
    labels = tuple(labels)
    letters = all(len(label) == 1 for label in labels)
    declared = _DECLARED_LETTER if letters else _DECLARED_WORD
    leading = _LEADING_LETTER if letters else _LEADING_WORD
    for found in (_first(declared.search(text)), _first(leading.match(text))):
        if found in labels:
            return found
    if options:
        said = normalise_answer(text)
        hits = [k for k, v in options.items() if k in labels and v and (said == v or said.startswith(v + " "))]
        if len(hits) == 1:
            return hits[0]
    return None


def closed_form_labels(references: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """yes/no/maybe when every reference parses as one of them, else lettered options A-J."""
    for labels in (YES_NO_MAYBE, LETTERS):
        if all(parse_choice(refs[0], labels) is not None for refs in references):
            return labels
    bad = next(refs[0] for refs in references if parse_choice(refs[0], LETTERS) is None)
    raise ValueError(f"data.kind=closed_form, but the reference answer {bad!r} is neither yes/no/maybe nor an "
                     "option letter A-J; use data.kind=free_text for this dataset")


def macro_f1(gold: Sequence[str], predicted: Sequence[str | None]) -> float:
    """Plain-loop macro-F1 (the definition the vectorised aggregator is tested against)."""
    classes = sorted({*gold, *(p for p in predicted if p is not None)})
    f1s = []
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, predicted))
        denominator = sum(g == c for g in gold) + sum(p == c for p in predicted)
        f1s.append(2 * tp / denominator)
    return float(np.mean(f1s))


# ------------------------------------------------------------------------------------------------ quality

def repeated_ngram_fraction(text: str, n: int = 3) -> float:
    """Share of the answer's word n-grams that repeat an earlier n-gram of the same answer (0 if < n words)."""
    words = normalise_answer(text).split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def word_count(text: str) -> int:
    return len(text.split())


# ---------------------------------------------------------------------------------------------- scoring

@dataclass
class Scored:
    """One model's scores on a set of questions, with what the bootstrap needs to recompute them."""

    values: dict[str, float]
    rows: list[dict]
    aggregators: dict[str, Aggregator] = field(default_factory=dict)


def _mean(values: Sequence[float]) -> Aggregator:
    arr = np.asarray(values, dtype=float)
    return lambda idx: arr[idx].mean(axis=1)


def _ratio(numerator: Sequence[float], denominator: Sequence[float]) -> Aggregator:
    num, den = np.asarray(numerator, dtype=float), np.asarray(denominator, dtype=float)

    def agg(idx: np.ndarray) -> np.ndarray:
        total = den[idx].sum(axis=1)
        return np.divide(num[idx].sum(axis=1), total, out=np.full(len(idx), np.nan), where=total > 0)
    return agg


def _bleu(stats: Sequence[Sequence[int]]) -> Aggregator:
    arr = np.asarray(stats, dtype=np.int64)
    return lambda idx: np.array([bleu_from_stats(arr[row].sum(axis=0)) for row in idx])


def _macro_f1(gold: Sequence[str], predicted: Sequence[str | None]) -> Aggregator:
    classes = sorted({*gold, *(p for p in predicted if p is not None)})
    g = np.array([[x == c for c in classes] for x in gold], dtype=float)
    p = np.array([[x == c for c in classes] for x in predicted], dtype=float)
    hit = g * p

    def agg(idx: np.ndarray) -> np.ndarray:
        tp, den = hit[idx].sum(axis=1), g[idx].sum(axis=1) + p[idx].sum(axis=1)
        f1 = np.divide(2 * tp, den, out=np.full(den.shape, np.nan), where=den > 0)
        return np.nanmean(f1, axis=1)
    return agg


def _finish(aggregators: dict[str, Aggregator], n: int, rows: list[dict], extra: dict[str, float]) -> Scored:
    everything = np.arange(n)[None, :]
    values = {name: float(agg(everything)[0]) for name, agg in aggregators.items()}
    return Scored(values={**values, **extra}, rows=rows, aggregators=aggregators)


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"need equal, non-zero numbers of predictions ({len(predictions)}) and references "
                         f"({len(references)})")
    if any(not refs for refs in references):
        raise ValueError("every question needs at least one reference answer")


def quality(predictions: Sequence[str], references: Sequence[Sequence[str]], ngram: int = 3,
            threshold: float = 0.25) -> tuple[dict[str, Aggregator], list[dict], dict[str, float]]:
    words = [word_count(p) for p in predictions]
    ref_words = [word_count(refs[0]) for refs in references]
    repeat = [repeated_ngram_fraction(p, ngram) for p in predictions]
    rows = [{"empty": float(not p.strip()), "repeated_ngram_fraction": r, "degenerate": float(r >= threshold),
             "answer_words": w} for p, r, w in zip(predictions, repeat, words)]
    aggregators = {
        "empty_rate": _mean([r["empty"] for r in rows]),
        "repetition_rate": _mean([r["degenerate"] for r in rows]),
        "length_ratio": _ratio(words, ref_words),
        "answer_words_mean": _mean(words),
        "reference_words_mean": _mean(ref_words),
    }
    p10, p50, p90 = np.percentile(words, [10, 50, 90])
    extra = {"answer_words_p10": float(p10), "answer_words_p50": float(p50), "answer_words_p90": float(p90)}
    return aggregators, rows, extra


def score_free_text(predictions: Sequence[str], references: Sequence[Sequence[str]], ngram: int = 3,
                    threshold: float = 0.25) -> Scored:
    _check(predictions, references)
    rows = [per_example(p, refs) for p, refs in zip(predictions, references)]
    aggregators: dict[str, Aggregator] = {name: _mean([r[name] for r in rows])
                                          for name in ("exact_match", "token_f1", "rouge1", "rouge2", "rougeL")}
    aggregators["bleu"] = _bleu([bleu_stats(p, refs) for p, refs in zip(predictions, references)])
    q_aggs, q_rows, extra = quality(predictions, references, ngram, threshold)
    rows = [{**r, **q} for r, q in zip(rows, q_rows)]
    return _finish({**aggregators, **q_aggs}, len(predictions), rows, extra)


def score_closed_form(predictions: Sequence[str], references: Sequence[Sequence[str]],
                      questions: Sequence[str], labels: Sequence[str] | None = None, ngram: int = 3,
                      threshold: float = 0.25) -> Scored:
    """Accuracy, macro-F1 and the unparseable rate from parsed labels (see the module docstring)."""
    _check(predictions, references)
    labels = tuple(labels or closed_form_labels(references))
    gold, parsed = [], []
    for prediction, refs, question in zip(predictions, references, questions):
        options = options_from_question(question) if labels == LETTERS else {}
        allowed = tuple(options) if options else labels
        gold.append(parse_choice(refs[0], allowed, options))
        parsed.append(parse_choice(prediction, allowed, options))
    if any(g is None for g in gold):
        bad = next(refs[0] for refs, g in zip(references, gold) if g is None)
        raise ValueError(f"reference answer {bad!r} names none of the options {labels}")
    rows = [{"gold": g, "parsed": p, "correct": float(p == g), "unparseable": float(p is None)}
            for g, p in zip(gold, parsed)]
    aggregators = {
        "accuracy": _mean([r["correct"] for r in rows]),
        "macro_f1": _macro_f1(gold, parsed),
        "unparseable_rate": _mean([r["unparseable"] for r in rows]),
    }
    q_aggs, q_rows, extra = quality(predictions, references, ngram, threshold)
    rows = [{**r, **q} for r, q in zip(rows, q_rows)]
    return _finish({**aggregators, **q_aggs}, len(predictions), rows, extra)


def score_choices(loglik: Sequence[np.ndarray], char_lengths: Sequence[Sequence[int]], gold: Sequence[int],
                  labels: Sequence[Sequence[str]]) -> Scored:
    """Likelihood scoring of closed-form questions: argmax of the log-likelihoods (raw and per character)."""
    if not loglik or len(loglik) != len(gold):
        raise ValueError(f"need equal, non-zero numbers of questions ({len(loglik)}) and gold answers ({len(gold)})")
    rows = []
    for ll, chars, g, names in zip(loglik, char_lengths, gold, labels):
        raw, norm = int(np.argmax(ll)), int(np.argmax(np.asarray(ll) / np.maximum(np.asarray(chars), 1)))
        rows.append({"gold": names[g], "parsed": names[raw], "parsed_norm": names[norm], "correct": float(raw == g),
                     "correct_norm": float(norm == g), "loglik": [float(x) for x in ll]})
    aggregators = {"accuracy": _mean([r["correct"] for r in rows]),
                   "accuracy_norm": _mean([r["correct_norm"] for r in rows]),
                   "macro_f1": _macro_f1([r["gold"] for r in rows], [r["parsed"] for r in rows])}
    return _finish(aggregators, len(rows), rows, {})


# -------------------------------------------------------------------------------------------- bootstrap

def resample_indices(n: int, samples: int, seed: int) -> np.ndarray:
    """`samples` bootstrap resamples of n rows; the same (n, seed) always gives the same matrix."""
    return np.random.default_rng([seed, n]).integers(0, n, size=(samples, n))


def paired_bootstrap(first: Aggregator, second: Aggregator, n: int, samples: int = 1000, seed: int = 0,
                     confidence: float = 0.95) -> dict:
    """Percentile CI of first - second, both recomputed on the same resampled rows.

    `significant` is True when the interval excludes zero. A difference the resamples cannot measure
    (NaN everywhere) gives no interval and is never significant.
    """
    everything = np.arange(n)[None, :]
    delta = float(first(everything)[0] - second(everything)[0])
    idx = resample_indices(n, samples, seed)
    deltas = first(idx) - second(idx)
    deltas = deltas[np.isfinite(deltas)]
    if not math.isfinite(delta) or deltas.size == 0:
        return {"delta": delta if math.isfinite(delta) else None, "low": None, "high": None,
                "significant": False, "n": n, "samples": samples, "confidence": confidence}
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(deltas, [tail, 100 - tail])
    return {"delta": delta, "low": float(low), "high": float(high), "significant": bool(low > 0 or high < 0),
            "n": n, "samples": samples, "confidence": confidence}


def compare(first: Scored, second: Scored, n: int, samples: int, seed: int, confidence: float,
            extra: dict[str, tuple[Aggregator, Aggregator, int]] | None = None) -> dict[str, dict]:
    """Paired bootstrap CI for every metric both sides can recompute (first - second)."""
    out = {}
    for name in first.aggregators:
        if name in second.aggregators:
            out[name] = paired_bootstrap(first.aggregators[name], second.aggregators[name], n, samples, seed,
                                         confidence)
    for name, (a, b, rows) in (extra or {}).items():
        out[name] = paired_bootstrap(a, b, rows, samples, seed, confidence)
    return out
