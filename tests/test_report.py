"""The HTML report: what a reviewer must find in it, computed from a hand-made comparison."""

from __future__ import annotations

import html as htmllib
import re

import pandas as pd

from medtune import report
from medtune import config as config_mod
from medtune.gate import decide


def _comparison(champion: bool) -> dict:
    base = {"exact_match": 0.0, "token_f1": 0.20, "bleu": 3.0, "rouge1": 0.25, "rouge2": 0.05, "rougeL": 0.18,
            "empty_rate": 0.0, "perplexity": 12.0}
    cand = {**base, "token_f1": 0.30, "rougeL": 0.21, "perplexity": 9.0}
    return {
        "kind": "free_text", "n": 4, "n_references": 5, "base": base, "candidate": cand,
        "champion": {**base, "rougeL": 0.25} if champion else None,
        "champion_info": {"available": champion, "name": "m", "version": "7" if champion else None,
                          "reason": "" if champion else "no version of m has alias 'champion'"},
        "ci": {"candidate_vs_base": {
            "token_f1": {"delta": 0.10, "low": 0.04, "high": 0.16, "significant": True, "n": 4, "confidence": 0.95},
            "rougeL": {"delta": 0.03, "low": -0.01, "high": 0.07, "significant": False, "n": 4, "confidence": 0.95}},
            "candidate_vs_champion": {"rougeL": {"delta": -0.04, "low": -0.09, "high": -0.01, "significant": True,
                                                 "n": 4, "confidence": 0.95}} if champion else None},
        "bootstrap": {"samples": 1000, "seed": 0, "confidence": 0.95}, "perplexity_split": "validation",
    }


def _predictions() -> pd.DataFrame:
    # rougeL gains (candidate - base): q1 +0.5, q2 -0.3, q3 +0.1, q4 0
    return pd.DataFrame({
        "id": ["1", "2", "3", "4"],
        "question": ["Q one?", "Q two?", "Q three <b>?", "Q four?"],
        "references": [["ref one"], ["ref two", "second ref two"], ["ref three"], ["ref four"]],
        "answer": ["ref one", "ref two", "ref three", "ref four"],
        "focus": ["f"] * 4, "qtype": ["symptoms", "symptoms", "treatment", None],
        "base_answer": ["b1", "b2", "b3", "b4"], "candidate_answer": ["c1", "c2", "c3", "c4"],
        "base_rougeL": [0.1, 0.6, 0.2, 0.3], "candidate_rougeL": [0.6, 0.3, 0.3, 0.3],
        "base_token_f1": [0.2, 0.4, 0.0, 0.2], "candidate_token_f1": [0.4, 0.4, 0.2, 0.2],
    })


POLICY = config_mod.from_dict({"name": "t", "data": {"path": "x.jsonl"}, "model": {"id": "m"},
                               "gate": {"rules": [{"metric": "rougeL", "min": 0.2, "significant": True}]}})


def _text(html: str) -> str:
    return htmllib.unescape(re.sub(r"<[^>]+>", " ", html))


def test_report_sections_metric_table_and_plain_headline():
    comp = {**_comparison(champion=True), "decoding": {"repetition_penalty": 1.0, "no_repeat_ngram_size": 3}}
    html = report.render(comp, decide(POLICY, comp), [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5},
                                                      {"step": 2, "eval_loss": 1.7}], _predictions(), "t")
    text = _text(html)
    for heading in ("Headline", "Gate: FAILED", "Metrics", "Training", "By question type", "Largest gains",
                    "Largest losses"):
        assert heading in text
    # rougeL's CI straddles zero: the report says so plainly, and the gate fails the significance rule
    assert "rougeL: the candidate did NOT beat the base model with a CI excluding zero" in text
    assert "token_f1: the candidate beat the base model" in text
    # the metric row carries base, candidate, champion and both differences with CIs (* = excludes zero)
    assert "0.1800" in text and "0.2100" in text and "0.2500" in text
    assert "+0.0300 [-0.0100, +0.0700]" in text and "+0.1000 [+0.0400, +0.1600] *" in text
    assert "-0.0400 [-0.0900, -0.0100] *" in text
    assert "champion: m version 7" in text
    assert "Answers are greedy with no_repeat_ngram_size=3 on the answer" in text  # the decoding, not its off knobs
    assert html.count("data:image/png;base64") == 2    # metric bars and the loss curve
    assert "Q three &lt;b&gt;?" in html                 # user text is escaped


def test_breakdown_by_question_type_by_hand():
    header, rows = report.breakdown(_predictions(), "free_text")
    assert header[:4] == ["question type", "n", "base rougeL", "candidate rougeL"]
    by_type = {r[0]: r for r in rows}
    # symptoms: base rougeL (0.1 + 0.6) / 2 = 0.35, candidate (0.6 + 0.3) / 2 = 0.45
    assert by_type["symptoms"][1:4] == [2, "0.350", "0.450"]
    assert by_type["(none)"][1] == 1 and by_type["all"][1] == 4
    assert by_type["all"][2:4] == ["0.300", "0.375"]


def test_gains_and_losses_are_ordered_and_show_every_reference():
    gained, lost = report.swings(_predictions(), "free_text")
    assert gained["id"].tolist() == ["1", "3"]        # +0.5, +0.1; q4 (0) is neither
    assert lost["id"].tolist() == ["2"]
    comp = _comparison(champion=False)
    html = report.render(comp, decide(POLICY, comp), [], _predictions(), "t")
    assert "<li>second ref two</li>" in html         # both references of q2, side by side with answers
    assert "+0.500" in html and "-0.300" in html
    text = _text(html)
    assert "champion: none (no version of m has alias 'champion')" in text
    assert "No training history" in text
    assert "earlier run" not in text  # every output computed in this run
    comp["reused_outputs"] = {"base": ["generate:test", "answer_nll:test", "loglikelihoods:mmlu_medical"]}
    assert "Outputs taken from an earlier run with the same weights, prompts, settings and code " \
           "(medtune.reuse): base (3)." in _text(report.render(comp, decide(POLICY, comp), [], _predictions(), "t"))
    # no champion: its column shows a dash, not a number
    row = re.search(r"<tr><td>rougeL</td>(.*?)</tr>", html).group(1)
    assert "<td>—</td>" in row


def test_suites_get_their_own_tables_and_a_length_change_is_flagged():
    comp = _comparison(champion=False)
    kqa = _comparison(champion=False)
    kqa["base"] = {**kqa["base"], "answer_words_mean": 60.0, "length_ratio": 0.6}
    kqa["candidate"] = {**kqa["candidate"], "answer_words_mean": 30.0, "length_ratio": 0.3}   # halved
    kqa.update(kind="free_text", scoring="generate", n=50)
    mcq = {"kind": "closed_form", "scoring": "likelihood", "n": 80, "base": {"accuracy": 0.30, "accuracy_norm": 0.35},
           "candidate": {"accuracy": 0.3125, "accuracy_norm": 0.3375}, "champion": None,
           "ci": {"candidate_vs_base": {"accuracy_norm": {"delta": -0.0125, "low": -0.05, "high": 0.025,
                                                          "significant": False, "n": 80, "confidence": 0.95}}}}
    comp["suites"] = {"kqa": kqa, "mmlu_medical": mcq}
    html = report.render(comp, decide(POLICY, comp), [], _predictions(), "t", length_change_flag=0.3)
    text = _text(html)
    assert "kqa: candidate answers average 30.0 words against the base model's 60.0 (-50%" in text
    assert "mmlu_medical (closed_form, likelihood, n=80)" in text
    assert "-0.0125 [-0.0500, +0.0250]" in text and "0.3125" in text
    assert "length_ratio" in re.search(r'<div id="suites">(.*?)</div>', html, re.S).group(1)
    # no flag under the threshold
    assert "No set's mean answer length changed" in _text(report.render(_comparison(False), decide(
        POLICY, _comparison(False)), [], _predictions(), "t"))
