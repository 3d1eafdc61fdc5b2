"""Closed-form questions: where their choices come from, and scoring them by likelihood.

Choices, in order of preference (`resolve`):

1. a choices/options column (a list of texts, or a mapping letter -> text); the answer is an option
   letter (A = the first choice) or the text of one choice;
2. lettered options written in the question (`A. ...`, `B) ...`, one per line or inline); the answer is
   one of their letters;
3. neither: the distinct gold answers of the whole set (yes/no/maybe, true/false, ...).

Scoring follows lm-evaluation-harness' multiple choice: each choice's log-likelihood as the continuation
of the prompt (the chat-rendered question, after `k` few-shot examples), summed over its tokens; the
prediction is the argmax (`accuracy`), or the argmax of log-likelihood per character of the choice
(`accuracy_norm`, which does not favour short choices). No answer is ever unparseable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medtune import metrics

LETTERS = "ABCDEFGHIJ"
MAX_SET_LABELS = 10  # more distinct answers than this is not a label set: the data is free text


@dataclass(frozen=True)
class Choices:
    labels: tuple[str, ...]   # what the gold answer and the prediction are reported as (A, B, ... or yes, no)
    texts: tuple[str, ...]    # what is scored as the continuation
    gold: int                 # index of the right choice
    source: str               # column / question / dataset


class ChoiceError(ValueError):
    """A closed-form row whose answer names none of its choices."""


def lettered_options(question: str) -> dict[str, str]:
    """Lettered options written in a question, letter -> text; only a run starting at A (2+ options) counts,
    so a stray "vitamin D. It..." is not an option list."""
    return metrics.option_run(question, str, str.strip)


def _key(text) -> str:
    return metrics.normalise_answer(str(text))


def dataset_labels(answers) -> tuple[str, ...]:
    """The distinct gold answers of a set (normalised), when they look like a label set (2-10 of them)."""
    labels = tuple(sorted({_key(a) for a in answers}))
    if not 2 <= len(labels) <= MAX_SET_LABELS:
        raise ChoiceError(f"the set has {len(labels)} distinct answers and no choices column or lettered options: "
                          "a closed-form set needs choices (2-10 labels)")
    return labels


def resolve(question: str, answer: str, column=None, set_labels: tuple[str, ...] | None = None) -> Choices:
    """The choices of one row and the index of its gold answer (see the module docstring for the order)."""
    if column is not None and len(column):
        letters, texts = (tuple(column), tuple(str(v) for v in column.values())) if isinstance(column, dict) \
            else (tuple(LETTERS[:len(column)]), tuple(str(v) for v in column))
        return Choices(tuple(str(x).upper() for x in letters), texts, _gold(answer, letters, texts), "column")
    options = lettered_options(question)
    if options:
        return Choices(tuple(options), tuple(options.values()),
                       _gold(answer, tuple(options), tuple(options.values())), "question")
    if set_labels is None:
        raise ChoiceError("no choices column, no lettered options in the question and no set of labels")
    return Choices(set_labels, set_labels, _gold(answer, set_labels, set_labels), "dataset")


def _gold(answer: str, labels: tuple[str, ...], texts: tuple[str, ...]) -> int:
    said = str(answer).strip()
    for i, label in enumerate(labels):
        if said.rstrip(".)").upper() == str(label).upper():
            return i
    hits = [i for i, text in enumerate(texts) if _key(text) == _key(said)]
    if len(hits) == 1:
        return hits[0]
    raise ChoiceError(f"answer {said[:60]!r} names none of the choices {', '.join(map(str, labels))}")


def render(tokenizer, system_prompt: str, question: str, shots: list[tuple[str, str]] = ()) -> str:
    """The chat prompt: system, then each few-shot example as a user/assistant turn, then the question."""
    messages = [{"role": "system", "content": system_prompt}]
    for q, a in shots:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def loglikelihoods(model, tokenizer, prompts: list[str], choices: list[Choices], batch_size: int) -> list[np.ndarray]:
    """Per row, the summed log-probability of each choice's tokens as the continuation of its prompt."""
    from medtune.evaluate import answer_nll

    pairs = [(i, p, t) for i, (p, c) in enumerate(zip(prompts, choices)) for t in c.texts]
    # Longest first, so batches hold similar lengths (little padding) and memory peaks early.
    order = sorted(range(len(pairs)), key=lambda j: -len(pairs[j][1]) - len(pairs[j][2]))
    nll, _ = answer_nll(model, tokenizer, [pairs[j][1] for j in order], [pairs[j][2] for j in order],
                        batch_size=batch_size, eos=False)
    by_pair = np.empty(len(pairs))
    by_pair[order] = -nll
    out, start = [], 0
    for c in choices:
        out.append(by_pair[start:start + len(c.texts)])
        start += len(c.texts)
    return out
