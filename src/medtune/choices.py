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


def loglikelihoods(model, tokenizer, prompts: list[str], choices: list[Choices], batch_size: int,
                   desc: str = "choices") -> list[np.ndarray]:
    """Per row, the summed log-probability of each choice's tokens as the continuation of its prompt.

    Each prompt runs once, and its choices continue from its KV cache: a 4-option question costs one prompt
    and four short continuations, not four prompt-plus-choice sequences (~3x fewer tokens on MMLU's prompts).
    The continuations run in groups of similar length, each padded to its own longest: MMLU's choices are 7.5
    tokens on average but up to 31, and padding every one to its batch's longest computed ~3x the tokens.
    Tokenised as `evaluate.answer_nll` does (prompt and choice separately, then joined). `batch_size` counts
    questions.
    """
    import torch
    from tqdm.auto import tqdm

    model.eval()
    out: list[np.ndarray] = [np.empty(0)] * len(prompts)
    # Longest first, so batches hold similar lengths (little padding) and memory peaks early.
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    with torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch"):
            idx = order[start:start + batch_size]
            p_ids = [tokenizer(prompts[i], add_special_tokens=False)["input_ids"] for i in idx]
            width = max(map(len, p_ids))
            # left padding, so every prompt ends in the last column and the choices continue from it
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in p_ids], device=model.device)
            ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in p_ids], device=model.device)
            # only the last position's logits are needed: skips the LM head (a fifth of a small model's FLOPs)
            # and a width x vocabulary logits tensor elsewhere
            prompt = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                           use_cache=True, logits_to_keep=1)
            first = torch.log_softmax(prompt.logits[:, -1].float(), dim=-1)  # predicts each choice's first token
            # (row in the batch, choice index, choice tokens), shortest first
            conts = sorted(((b, k, tokenizer(t, add_special_tokens=False)["input_ids"])
                            for b, i in enumerate(idx) for k, t in enumerate(choices[i].texts)),
                           key=lambda c: len(c[2]))
            totals = {(b, k): float(first[b, c[0]]) for b, k, c in conts}
            for group in (conts[g:g + batch_size] for g in range(0, len(conts), batch_size)):
                longer = [c for c in group if len(c[2]) > 1]  # a one-token choice is scored by `first` alone
                tails = _continuations(model, prompt.cache, mask, longer, tokenizer.pad_token_id)
                for (b, k, _), tail in zip(longer, tails):
                    totals[(b, k)] += tail
            for b, i in enumerate(idx):
                out[i] = np.array([totals[(b, k)] for k in range(len(choices[i].texts))])
    return out


def _continuations(model, cache, mask, group: list[tuple[int, int, list[int]]], pad: int) -> list[float]:
    """Summed log-probability of each continuation's tokens after its first, given its prompt's cached keys and
    values (the first token's comes from the prompt's last logits)."""
    import copy

    import torch

    if not group:
        return []
    rows = torch.tensor([b for b, _, _ in group], device=model.device)
    tokens = [c for _, _, c in group]
    c_width = max(map(len, tokens))
    cache = copy.deepcopy(cache)  # the prompts' cache serves every group of the batch: select rows on a copy
    cache.batch_select_indices(rows)
    c_mask = torch.tensor([[1] * len(c) + [0] * (c_width - len(c)) for c in tokens], device=model.device)
    c_pos = mask.sum(-1)[rows][:, None] + torch.arange(c_width, device=model.device)
    logits = model(input_ids=torch.tensor([c + [pad] * (c_width - len(c)) for c in tokens], device=model.device),
                   attention_mask=torch.cat([mask[rows], c_mask], dim=1), position_ids=c_pos,
                   cache=cache, use_cache=True).logits.float()
    rest = torch.log_softmax(logits[:, :-1], dim=-1)  # position k predicts token k + 1
    return [float(rest[r, torch.arange(len(c) - 1), torch.tensor(c[1:], dtype=torch.long)].sum())
            for r, c in enumerate(tokens)]
