"""The recipe's decoding settings (`decoding:`) as transformers logits processors that look at the answer only.

transformers' own `repetition_penalty` and `no_repeat_ngram_size` arguments of `generate()` count the prompt
too for a decoder-only model, so an answer could not repeat the terms of its own question ("What are the
symptoms of Addison disease?" ... "Addison disease"). Here the same library processors see only the tokens
generated after the prompt. Every prompt of a batch ends in the same column (left padding), so one width fits
all rows.
"""

from __future__ import annotations

from transformers import LogitsProcessor, NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from medtune.config import DecodingConfig


class AnswerOnly(LogitsProcessor):
    """Apply `inner` to the tokens after column `prompt_width` only."""

    def __init__(self, inner: LogitsProcessor, prompt_width: int):
        self.inner, self.prompt_width = inner, prompt_width

    def __call__(self, input_ids, scores):
        return self.inner(input_ids[:, self.prompt_width:], scores)


def processors(decoding: DecodingConfig, prompt_width: int) -> list[LogitsProcessor]:
    """What `decoding` adds to greedy (or sampled) generation of answers to prompts `prompt_width` tokens wide."""
    inner = []
    if decoding.repetition_penalty != 1.0:
        inner.append(RepetitionPenaltyLogitsProcessor(decoding.repetition_penalty))
    if decoding.no_repeat_ngram_size:
        inner.append(NoRepeatNGramLogitsProcessor(decoding.no_repeat_ngram_size))
    return [AnswerOnly(p, prompt_width) for p in inner]
