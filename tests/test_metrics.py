"""Metric functions against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import sacrebleu

from medtune import metrics as M


def test_squad_normalisation_drops_case_punctuation_articles_and_extra_space():
    assert M.normalise_answer("The  Cat, sat -- on A mat!") == "cat sat on mat"


def test_exact_match_uses_normalisation_and_the_best_reference():
    assert M.exact_match("The answer.", ["an Answer"]) == 1.0
    assert M.exact_match("answer", ["something else", "ANSWER!"]) == 1.0
    assert M.exact_match("answers", ["answer"]) == 0.0


def test_token_f1_by_hand():
    # pred [cat, sat, on, mat] vs ref [cat, sat]: 2 common; P = 2/4, R = 2/2, F1 = 2*0.5*1/1.5 = 2/3
    assert M.token_f1("the cat sat on the mat", ["a cat sat"]) == pytest.approx(2 / 3)
    # best of two references: "dog ran" shares nothing; "cat sat down": P = 1, R = 2/3, F1 = 0.8
    assert M.token_f1("cat sat", ["dog ran", "cat sat down"]) == pytest.approx(0.8)
    # repeated tokens are clipped: pred [no, no, no] vs ref [no]: 1 common, P = 1/3, R = 1, F1 = 0.5
    assert M.token_f1("no no no", ["no"]) == pytest.approx(0.5)
    assert M.token_f1("", ["something"]) == 0.0


def test_bleu_brevity_penalty_by_hand():
    # Every n-gram of the 4-word hypothesis is in the 8-word reference: all precisions are 1, so
    # BLEU = BP * 100 = exp(1 - 8/4) * 100 = 36.788
    preds, refs = ["w1 w2 w3 w4"], [["w1 w2 w3 w4 w5 w6 w7 w8"]]
    assert M.corpus_bleu(preds, refs) == pytest.approx(100 * math.exp(-1), abs=1e-3)
    scored = M.score_free_text(preds, refs)
    assert scored.values["bleu"] == pytest.approx(100 * math.exp(-1), abs=1e-3)


def test_bleu_is_corpus_level_and_uses_all_references():
    preds = ["the cat sat on the mat", "a dog ran in the park today"]
    refs = [["the cat sat on a mat", "a cat sat on the mat"], ["a dog ran in the park today"]]
    expected = sacrebleu.corpus_bleu(preds, [["the cat sat on a mat", "a dog ran in the park today"],
                                             ["a cat sat on the mat", "a dog ran in the park today"]]).score
    assert M.corpus_bleu(preds, refs) == pytest.approx(expected)
    # the bootstrap's per-question statistics add up to the same corpus score
    assert M.score_free_text(preds, refs).values["bleu"] == pytest.approx(expected)
    # corpus BLEU is not the mean of sentence BLEUs
    sentence_mean = np.mean([sacrebleu.sentence_bleu(p, r).score for p, r in zip(preds, refs)])
    assert abs(expected - sentence_mean) > 0.1


def test_rouge_by_hand_with_stemming():
    # pred unigrams {the, cat, sat} all in the 6-token reference: P = 1, R = 3/6, F = 2/3
    # bigrams: pred 2 (the cat, cat sat), ref 5, overlap 2: P = 1, R = 0.4, F = 0.8/1.4 = 0.5714
    # LCS = 3 = the unigram case: F = 2/3
    scores = M.rouge("the cat sat", ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(2 / 3)
    assert scores["rouge2"] == pytest.approx(0.8 / 1.4)
    assert scores["rougeL"] == pytest.approx(2 / 3)
    # the Porter stemmer makes "running dogs" match "run dog"
    assert M.rouge("running dogs", ["run dog"])["rouge1"] == pytest.approx(1.0)
    # best reference counts
    assert M.rouge("cat", ["dog", "cat"])["rouge1"] == pytest.approx(1.0)


def test_free_text_scores_average_over_questions():
    scored = M.score_free_text(["cat sat", "dog"], [["cat sat down"], ["bird"]])
    # token F1: 0.8 and 0 -> 0.4; exact match 0 and 0
    assert scored.values["token_f1"] == pytest.approx(0.4)
    assert scored.values["exact_match"] == 0.0
    assert [r["token_f1"] for r in scored.rows] == pytest.approx([0.8, 0.0])


def test_repetition_by_hand():
    # trigrams of "x y z x y z": xyz, yzx, zxy, xyz -> 4 grams, 3 distinct: 1 - 3/4 = 0.25
    assert M.repeated_ngram_fraction("x y z x y z", 3) == pytest.approx(0.25)
    assert M.repeated_ngram_fraction("loop loop loop loop loop", 3) == pytest.approx(1 - 1 / 3)
    assert M.repeated_ngram_fraction("too short", 3) == 0.0


def test_quality_checks_by_hand():
    preds = ["", "x y z x y z", "one two three four", "   "]
    refs = [["r1 r2"], ["r1 r2 r3 r4"], ["r1 r2 r3 r4 r5 r6", "longer alternative reference here too"], ["r1 r2"]]
    v = M.score_free_text(preds, refs, ngram=3, threshold=0.25).values
    assert v["empty_rate"] == pytest.approx(2 / 4)           # "" and whitespace only
    assert v["repetition_rate"] == pytest.approx(1 / 4)      # only "x y z x y z" reaches 0.25
    # words 0 + 6 + 4 + 0 = 10 against first references 2 + 4 + 6 + 2 = 14
    assert v["length_ratio"] == pytest.approx(10 / 14)
    assert v["answer_words_mean"] == pytest.approx(2.5)
    assert v["reference_words_mean"] == pytest.approx(3.5)
    assert v["answer_words_p50"] == pytest.approx(2.0)       # median of 0, 0, 4, 6
    assert M.score_free_text(preds, refs, threshold=0.3).values["repetition_rate"] == 0.0


YNM_GOLD = ["yes", "no", "maybe", "yes", "no", "yes"]
YNM_PREDS = ["Yes, it can be prevented.", "No.", "I am not sure", "There is no evidence either way",
             "The answer is no", "maybe"]


def test_yes_no_maybe_parsing_is_conservative():
    parsed = [M.parse_choice(p, M.YES_NO_MAYBE) for p in YNM_PREDS]
    # "There is no evidence" commits to nothing: a label word inside the text is not an answer
    assert parsed == ["yes", "no", None, None, "no", "maybe"]
    assert M.parse_choice("Yesterday I", M.YES_NO_MAYBE) is None
    assert M.parse_choice("", M.YES_NO_MAYBE) is None


def test_closed_form_scores_with_unparseable_answers_by_hand():
    scored = M.score_closed_form(YNM_PREDS, [[g] for g in YNM_GOLD], ["q?"] * 6)
    v = scored.values
    # correct: yes, no, -, -, no(gold no), maybe(gold yes) -> 3 of 6
    assert v["accuracy"] == pytest.approx(0.5)
    assert v["unparseable_rate"] == pytest.approx(2 / 6)
    # per class F1 = 2 tp / (gold + predicted): yes 2*1/(3+1) = 0.5; no 2*2/(2+2) = 1; maybe 0/(1+1) = 0
    assert v["macro_f1"] == pytest.approx(0.5)
    assert M.macro_f1(YNM_GOLD, [r["parsed"] for r in scored.rows]) == pytest.approx(0.5)
    assert [r["unparseable"] for r in scored.rows] == [0, 0, 1, 1, 0, 0]


def test_multiple_choice_letters_and_option_text():
    question = "Which is an NSAID? A) Paracetamol B) Ibuprofen C) Codeine"
    options = M.options_from_question(question)
    assert options == {"a": "paracetamol", "b": "ibuprofen", "c": "codeine"}
    labels = tuple(options)
    assert M.parse_choice("B) ibuprofen", labels, options) == "b"
    assert M.parse_choice("(c)", labels, options) == "c"
    assert M.parse_choice("The answer is B because it is", labels, options) == "b"
    assert M.parse_choice("Ibuprofen is one", labels, options) == "b"
    # the article "A" and "answer is a ..." are not option A
    assert M.parse_choice("A patient should ask", labels, options) is None
    assert M.parse_choice("the answer is a common drug", labels, options) is None
    assert M.parse_choice("D.", labels, options) is None          # not an option of this question
    scored = M.score_closed_form(["B", "A patient", "answer: (c)"], [["B"], ["A) Paracetamol"], ["B"]],
                                 [question] * 3)
    assert [r["parsed"] for r in scored.rows] == ["b", None, "c"]
    assert scored.values["accuracy"] == pytest.approx(1 / 3)


def test_closed_form_rejects_free_text_references():
    with pytest.raises(ValueError, match="data.kind=free_text"):
        M.score_closed_form(["yes"], [["Diabetes is a condition of high blood sugar."]], ["q?"])


def test_bootstrap_constant_difference_gives_a_point_interval():
    a, b = M._mean([0.5, 0.7, 0.9, 0.6]), M._mean([0.4, 0.6, 0.8, 0.5])  # every question +0.1
    ci = M.paired_bootstrap(a, b, 4, samples=500, seed=1)
    assert ci["delta"] == pytest.approx(0.1)
    assert ci["low"] == pytest.approx(0.1) and ci["high"] == pytest.approx(0.1)
    assert ci["significant"] is True


def test_bootstrap_identical_models_are_not_significant():
    a = M._mean([0.1, 0.9, 0.4])
    ci = M.paired_bootstrap(a, a, 3, samples=300, seed=0)
    assert (ci["delta"], ci["low"], ci["high"], ci["significant"]) == (0.0, 0.0, 0.0, False)


def test_bootstrap_mixed_difference_straddles_zero_and_is_seeded():
    first, second = M._mean([1, 0, 1, 0, 1, 0, 1, 0]), M._mean([0, 1, 0, 1, 0, 1, 0, 0])
    ci = M.paired_bootstrap(first, second, 8, samples=2000, seed=3)
    assert ci["delta"] == pytest.approx(1 / 8)
    assert ci["low"] < 0 < ci["high"] and ci["significant"] is False
    assert M.paired_bootstrap(first, second, 8, samples=2000, seed=3) == ci


def test_bootstrap_recomputes_corpus_metrics_per_resample():
    gold = ["yes", "no", "maybe", "yes", "no"]
    pred = ["yes", "no", None, "no", "no"]
    agg = M._macro_f1(gold, pred)
    idx = M.resample_indices(5, 50, seed=7)
    loop = [M.macro_f1([gold[i] for i in row], [pred[i] for i in row]) for row in idx]
    assert agg(idx) == pytest.approx(loop)
    # an unmeasurable difference has no interval and is never significant
    nan = lambda idx: np.full(len(idx), np.nan)  # noqa: E731
    assert M.paired_bootstrap(nan, agg, 5)["significant"] is False
