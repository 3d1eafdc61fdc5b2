"""Closed-form questions: choice detection and likelihood scoring against hand-computed log-probabilities."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from medtune import choices, config as config_mod, evaluate as ev, metrics, models, suites


def test_lettered_options_in_the_question_one_per_line_and_inline():
    vignette = ("A 45-year-old man presents with chest pain radiating to the left arm. Which is the next step?\n"
                "A. Aspirin\nB. Coronary angiography\nC. Reassurance\nD. Antacids")
    assert choices.lettered_options(vignette) == {"A": "Aspirin", "B": "Coronary angiography", "C": "Reassurance",
                                                  "D": "Antacids"}
    assert choices.lettered_options("Which vitamin? A) vitamin C B) vitamin D") == {"A": "vitamin C",
                                                                                  "B": "vitamin D"}
    # a stray "vitamin D. It ..." is not an option list (no run starting at A)
    assert choices.lettered_options("Too little vitamin D. It weakens bones.") == {}
    c = choices.resolve(vignette, "B")
    assert (c.labels, c.gold, c.source) == (("A", "B", "C", "D"), 1, "question")
    assert c.texts[c.gold] == "Coronary angiography"


def test_yes_no_maybe_from_the_distinct_gold_answers():
    answers = ["yes", "No", "maybe", "yes."]
    labels = choices.dataset_labels(answers)
    assert labels == ("maybe", "no", "yes")
    c = choices.resolve("Does smoking raise the risk of lung cancer?", "Yes.", None, labels)
    assert c.texts == labels and c.labels[c.gold] == "yes" and c.source == "dataset"
    with pytest.raises(choices.ChoiceError, match="distinct answers"):
        choices.dataset_labels([f"answer {i}" for i in range(20)])


def test_choices_column_letter_or_text_and_a_letter_outside_the_options_is_refused():
    c = choices.resolve("Which organ makes insulin?", "C", ["liver", "kidney", "pancreas", "spleen"])
    assert c.labels == ("A", "B", "C", "D") and c.gold == 2 and c.source == "column"
    assert choices.resolve("Which organ makes insulin?", "pancreas", ["liver", "pancreas"]).gold == 1
    with pytest.raises(choices.ChoiceError, match="names none of the choices A, B"):
        choices.resolve("Which organ makes insulin?", "E", ["liver", "pancreas"])
    items = ev.questions(pd.DataFrame({"id": ["q1", "q2"], "question": ["Which organ?", "Which gland?"],
                                       "answer": ["A", "Z"], "choices": [["liver", "skin"], ["thyroid", "eye"]]}))
    with pytest.raises(choices.ChoiceError, match=r"set.jsonl: row 2 \(id q2\), field 'answer'"):
        ev.closed_form_set("s", items, "likelihood", origin="set.jsonl")


def _hand_loglik(model, tokenizer, prompt: str, continuation: str) -> float:
    """log P(continuation | prompt), one token at a time from the full sequence's logits."""
    p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    c = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([p + c])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return float(sum(logprobs[len(p) + i - 1, tok] for i, tok in enumerate(c)))


@pytest.mark.parametrize("batch_size", [1, 2, 3])  # 2: the five continuations run in three length groups
def test_likelihood_matches_hand_computed_log_probabilities(tiny_model_dir, batch_size):
    cfg = config_mod.ModelConfig(id=str(tiny_model_dir), source="path")
    tokenizer = models.load_tokenizer(cfg, padding_side="left")
    model = models.load_model(cfg, config_mod.TrainConfig(dtype="float32"))
    system = config_mod.PreprocessConfig().system_prompt
    rows = [("Is high blood pressure a risk for stroke?", "Yes.", ("maybe", "no", "yes")),
            ("Which helps a cold? A. rest and fluids B. antibiotics", "A", None)]
    resolved = [choices.resolve(q, a, None, labels) for q, a, labels in rows]
    prompts = [choices.render(tokenizer, system, q) for q, _, _ in rows]
    got = choices.loglikelihoods(model, tokenizer, prompts, resolved, batch_size=batch_size)  # pads across rows
    for prompt, c, ll in zip(prompts, resolved, got):
        expected = [_hand_loglik(model, tokenizer, prompt, text) for text in c.texts]
        np.testing.assert_allclose(ll, expected, rtol=1e-4, atol=1e-4)
    assert [len(ll) for ll in got] == [3, 2]


def test_accuracy_raw_and_length_normalised_from_logliks():
    ll = [np.array([-2.0, -3.0]), np.array([-1.0, -4.0]), np.array([-6.0, -5.0])]
    chars = [[1, 10], [2, 2], [2, 10]]
    scored = metrics.score_choices(ll, chars, gold=[1, 0, 0], labels=[("A", "B")] * 3)
    # raw argmax: A, A, B -> right on row 2 only; per character: B (-0.3 > -2), A, B (-0.5 > -3) -> rows 1, 2
    assert scored.values["accuracy"] == pytest.approx(1 / 3)
    assert scored.values["accuracy_norm"] == pytest.approx(2 / 3)
    assert [r["parsed"] for r in scored.rows] == ["A", "A", "B"]
    assert scored.values["macro_f1"] == pytest.approx(metrics.macro_f1(["B", "A", "A"], ["A", "A", "B"]))


def test_suites_are_scored_for_every_model_with_paired_cis(tiny_config, tmp_path):
    mcq = tmp_path / "mcq.jsonl"
    mcq.write_text("".join(json.dumps({"question": f"Is rest good for a cold {i}?", "answer": "yes" if i % 3 else "no",
                                       "opts": ["yes", "no"]}) + "\n" for i in range(12)))
    free = tmp_path / "free.jsonl"
    free.write_text("".join(json.dumps({"question": f"What helps a cold {i}? Call me at 301-496-5248",
                                        "answer": "rest and fluids"}) + "\n" for i in range(6)))
    tree = tiny_config.model_dump(mode="json")
    tree["eval"]["suites"] = [
        {"name": "mcq", "path": str(mcq), "kind": "closed_form", "columns": {"opts": "choices"}, "max_rows": 10,
         "rules": [{"metric": "accuracy", "non_inferior": 0.05}]},
        {"name": "free", "path": str(free), "kind": "free_text", "rules": [{"metric": "rougeL", "non_inferior": 0.02}]}]
    cfg = config_mod.from_dict(tree)
    sets = suites.scored_sets(cfg)
    test_rows = pd.read_json(tiny_config.data.path, lines=True).head(8)
    result = ev.evaluate(cfg, test_rows, None, suites=sets)
    comparison = ev.write_outputs(result, tmp_path / "comparison.json", tmp_path / "predictions")
    assert set(comparison["suites"]) == {"mcq", "free"}
    # each suite's answers, question by question, beside the own split's
    for name, n in (("predictions", len(result.items)), ("mcq", 10), ("free", 6)):
        rows = pd.read_json(tmp_path / "predictions" / f"{name}.jsonl", lines=True)
        assert len(rows) == n and {"question", "references", "base_answer"} <= set(rows.columns)
    assert set(pd.read_json(tmp_path / "predictions" / "mcq.jsonl", lines=True)["base_answer"]) <= {"A", "B"}  # yes, no
    # a suite skips the data contract's masking: its file, logged to MLflow, is masked on the way out
    written = (tmp_path / "predictions" / "free.jsonl").read_text()
    assert "301-496-5248" not in written and written.count("[PHONE]") == 6
    mcq_scored = comparison["suites"]["mcq"]
    assert mcq_scored["n"] == 10 and mcq_scored["scoring"] == "likelihood"
    assert 0.0 <= mcq_scored["base"]["accuracy"] <= 1.0 and "unparseable_rate" not in mcq_scored["base"]
    assert comparison["suites"]["free"]["base"]["answer_words_mean"] >= 0
    flat = ev.flat_metrics(comparison)
    assert "suite.mcq.base.accuracy_norm" in flat and "suite.free.base.rougeL" in flat


def test_closed_form_contract_keeps_exam_vignettes_and_one_letter_answers_and_quarantines_bad_letters(tmp_path):
    from medtune.validate import validate

    vignette = ("A 67-year-old woman with a history of hypertension and type 2 diabetes comes to the emergency "
                "department because of sudden weakness of her right arm and difficulty speaking. " * 8)
    rows = [{"id": f"q{i}", "question": vignette + "\nA. Aspirin\nB. Alteplase\nC. Warfarin\nD. Heparin",
             "answer": "B"} for i in range(4)]
    rows.append({"id": "bad", "question": vignette + "\nA. Aspirin\nB. Alteplase", "answer": "E"})
    data = tmp_path / "mcq.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(rows[0]["question"]) > 1_000, "longer than the free-text bound"
    result = validate(config_mod.DataConfig(path=str(data), kind="closed_form", min_kept_fraction=0.5))
    assert result.summary["rows_kept"] == 4 and result.summary["rows_quarantined"] == 1
    [bad] = result.quarantine
    assert bad["rule"] == "answer.names_a_choice" and bad["line"] == 5 and "'E'" in bad["detail"]


def test_shipped_suites_load_and_few_shot_examples_come_from_the_dev_file(tiny_config):
    shipped = config_mod.load(suites.ROOT / "configs" / "local.yaml")
    mmlu, kqa = suites.scored_sets(shipped)
    # 174 rows, 172 questions: two identical questions (same options, same answer) sit in two subjects each
    assert (mmlu.name, mmlu.scoring, len(mmlu.items)) == ("mmlu_medical", "likelihood", 172)
    assert all(len(c.texts) == 4 and c.source == "column" for c in mmlu.choices)
    assert (kqa.kind, len(kqa.items)) == ("free_text", 100)
    suite = shipped.eval.suites[0].model_copy(update={"few_shot_k": 2})
    with_shots = suites.scored_set(shipped, suite)
    dev = [json.loads(line) for line in (suites.ROOT / suite.few_shot_path).read_text().splitlines()[:2]]
    assert with_shots.shots == [(d["question"], d["options"]["ABCD".index(d["answer"])]) for d in dev]
    tokenizer = models.load_tokenizer(tiny_config.model)
    prompt = choices.render(tokenizer, "sys", "Q?", with_shots.shots)
    assert prompt.count("<|assistant|>") == 3 and dev[1]["question"].lower()[:20] in prompt.lower()
