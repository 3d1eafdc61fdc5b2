"""The facts about every metric, in one place: its name, its better direction and what kind of set it scores.

Config validation (which metrics a gate rule may name), the gate (what "improvement" means), the report
(the "better" column) and MLflow logging all read this table; nothing else lists metrics. Lightweight on
purpose (no numpy): the config imports it.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Direction = Literal["higher", "lower", "none"]
Kind = Literal["free_text", "closed_form", "quality"]
# The models one evaluation compares, in report order. sft: the SFT-only result the candidate was preference-tuned
# from, scored only when the preference stage ran.
MODELS = ("base", "candidate", "sft", "champion")


class Metric(NamedTuple):
    name: str
    direction: Direction
    kind: Kind


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("exact_match", "higher", "free_text"),
    Metric("token_f1", "higher", "free_text"),
    Metric("bleu", "higher", "free_text"),
    Metric("rouge1", "higher", "free_text"),
    Metric("rouge2", "higher", "free_text"),
    Metric("rougeL", "higher", "free_text"),
    Metric("accuracy", "higher", "closed_form"),
    Metric("accuracy_norm", "higher", "closed_form"),    # likelihood scoring, per-character normalised
    Metric("macro_f1", "higher", "closed_form"),
    Metric("unparseable_rate", "lower", "closed_form"),  # generate-and-parse scoring only
    Metric("empty_rate", "lower", "quality"),
    Metric("repetition_rate", "lower", "quality"),
    Metric("perplexity", "lower", "quality"),
    # Lengths have no better direction: floors and ceilings only.
    Metric("length_ratio", "none", "quality"),
    Metric("answer_words_mean", "none", "quality"),
    Metric("answer_words_p10", "none", "quality"),
    Metric("answer_words_p50", "none", "quality"),
    Metric("answer_words_p90", "none", "quality"),
    Metric("reference_words_mean", "none", "quality"),
)}
PRIMARY = {"free_text": ("rougeL", "token_f1"), "closed_form": ("accuracy", "macro_f1")}


def of_kind(kind: Kind) -> tuple[str, ...]:
    return tuple(name for name, m in METRICS.items() if m.kind == kind)


def sign(metric: str) -> int:
    """+1 higher is better, -1 lower is better, 0 no better direction."""
    return {"higher": 1, "lower": -1, "none": 0}[METRICS[metric].direction]
