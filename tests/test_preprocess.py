"""Preprocessing: the duplicate rule, leakage-free grouped splits, byte-stable output and fingerprints."""

from __future__ import annotations

import hashlib
import json

import pandas as pd
import pytest
from transformers import AutoTokenizer

from conftest import SAMPLE, open_sqlite_run, tiny_config_tree
from medtune.config import PreprocessConfig
from medtune.preprocess import (LeakageError, check_no_leakage, prepare, render_prompt, render_prompts, write_split,
                                _canonical_frame, _deduplicate)
from medtune import rows


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def sample() -> pd.DataFrame:
    return pd.read_json(SAMPLE, lines=True, dtype=False)


def frame(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame([{"id": i, "question": q, "answer": a, "focus": f, "_file": "f.jsonl", "_line": n + 1}
                         for n, (i, q, a, f) in enumerate(rows)])


DUPES = [
    ("a", "What is gout?", "A kind of arthritis.", "Gout"),
    ("b", "what is  GOUT?", "A kind of  arthritis.", "Gout"),     # same question and answer once normalised
    ("c", "What is gout? ", "Painful joints from uric acid.", "Gout"),  # same question, different answer
    ("d", "What is flu?", "A virus.", "Flu"),
]


def test_duplicate_rule_drops_copies_and_conflicts_by_default():
    df, dropped, conflicts = _deduplicate(_canonical_frame(frame(DUPES)), PreprocessConfig())
    assert list(df["id"]) == ["a", "d"]
    assert [(d["row"]["id"], d["rule"], d["line"]) for d in dropped] == [
        ("b", "duplicate_question_same_answer", 2), ("c", "duplicate_question_conflicting_answer", 3)]
    assert dropped[1]["detail"] == "same question as a (f.jsonl) with a different answer; kept that one"
    assert conflicts == [{"question": "What is gout?", "answers": [
        {"id": "a", "source": None, "file": "f.jsonl", "answer": "A kind of arthritis."},
        {"id": "c", "source": None, "file": "f.jsonl", "answer": "Painful joints from uric acid."}]}]


def test_keep_mode_keeps_conflicting_answers_in_one_split(tokenizer):
    cfg = PreprocessConfig(conflicting_duplicates="keep", max_tokens=512, test_fraction=0.4, val_fraction=0.2)
    rows = DUPES + [(f"x{i}", f"What is topic {i}?", "Something.", f"T{i}") for i in range(20)]
    # the conflicting copy has no focus: only the question links it to its twin
    rows[2] = ("c", "What is gout? ", "Painful joints from uric acid.", None)
    prepared = prepare(frame(rows), tokenizer, cfg)
    where = {r: name for name, s in prepared.splits.items() for r in s["id"]}
    assert where["a"] == where["c"] and "b" not in where
    assert prepared.summary["dropped_by_rule"]["duplicate_question_same_answer"] == 1
    assert prepared.summary["conflicting_duplicate_questions"] == 1


def test_splits_group_by_topic_and_account_for_every_row(tokenizer, sample):
    prepared = prepare(sample, tokenizer, PreprocessConfig(max_tokens=512))
    s = prepared.summary
    assert s["rows_in"] == 320 == s["rows_out"] + s["rows_dropped"]
    topics = {name: set(df["focus"].str.casefold()) for name, df in prepared.splits.items()}
    assert not topics["train"] & topics["test"] and not topics["train"] & topics["validation"]
    assert not topics["validation"] & topics["test"]
    sizes = {name: v["rows"] for name, v in s["splits"].items()}
    assert sum(sizes.values()) == s["rows_out"] and 0.05 < sizes["test"] / s["rows_out"] < 0.2


def test_same_input_and_seed_give_byte_identical_splits(tmp_path, tokenizer, sample):
    cfg = PreprocessConfig(max_tokens=512)
    first = prepare(sample, tokenizer, cfg)
    shuffled = prepare(sample.sample(frac=1.0, random_state=7), tokenizer, cfg)
    other_seed = prepare(sample, tokenizer, PreprocessConfig(max_tokens=512, seed=7))
    for name in first.splits:
        write_split(first.splits[name], tmp_path / "a" / name)
        write_split(shuffled.splits[name], tmp_path / "b" / name)
        a, b = (tmp_path / "a" / name / "rows.jsonl").read_bytes(), (tmp_path / "b" / name / "rows.jsonl").read_bytes()
        assert a == b
        assert first.summary["splits"][name]["fingerprint"] == hashlib.sha256(a).hexdigest()
    assert first.summary["splits"] == shuffled.summary["splits"]
    assert other_seed.summary["splits"]["test"]["fingerprint"] != first.summary["splits"]["test"]["fingerprint"]


def test_token_budget_drops_long_rows_with_their_count(tokenizer, sample):
    prepared = prepare(sample, tokenizer, PreprocessConfig(max_tokens=80))
    over = [d for d in prepared.dropped if d["rule"] == "over_token_budget"]
    assert over and prepared.summary["dropped_by_rule"]["over_token_budget"] == len(over)
    assert all(int(d["detail"].split()[0]) > 80 for d in over)
    kept = pd.concat(prepared.splits.values())
    assert kept["n_tokens"].max() <= 80 and len(kept) + len(over) == 320


def test_batched_rendering_matches_the_chat_template(tokenizer):
    system = PreprocessConfig().system_prompt
    questions, contexts = ["What is gout?", "What is flu?"], [None, "Flu is seasonal."]
    assert render_prompts(tokenizer, system, questions, contexts) == [
        render_prompt(tokenizer, system, q, c) for q, c in zip(questions, contexts)]
    assert "Context:\nFlu is seasonal.\n\nQuestion: What is flu?" in render_prompts(tokenizer, system, questions,
                                                                                   contexts)[1]


def test_leakage_check_fails_on_a_topic_in_two_splits():
    df = pd.DataFrame({"qkey": ["a", "b", "c"], "focus": ["Gout", "gout", None], "split": ["train", "test", "test"]})
    leak = r"1 questions/topics are in more than one split.*'topic: gout': \['test', 'train'\]"
    with pytest.raises(LeakageError, match=leak):
        check_no_leakage(df)
    assert check_no_leakage(df.assign(split="train"))["success"] is True


def test_steps_log_data_docs_quarantine_and_dataset_inputs(tmp_path, tiny_model_dir):
    import mlflow

    from medtune.steps import preprocess, validate_data

    data = tmp_path / "in.jsonl"
    data.write_text(SAMPLE.read_text() + '{"question": "What is gout?", "answer"\n')
    tree = tiny_config_tree(tiny_model_dir, data)
    tree["preprocess"]["max_tokens"] = 512
    cfg_json, run_id = open_sqlite_run(tree, tmp_path, "data-steps")
    out = tmp_path / "out"
    summary = validate_data.run(cfg_json, run_id, str(out / "data"), str(out / "quarantine.jsonl"),
                                  str(out / "validation.json"), str(out / "docs.html"))
    assert (summary["rows_read"], summary["rows_kept"], summary["quarantined_by_rule"]) == (321, 320, {"not_json": 1})
    assert json.loads((out / "quarantine.jsonl").read_text())["line"] == 321
    splits = {n: str(out / n) for n in ("train", "validation", "test")}
    prepared = preprocess.run(cfg_json, run_id, str(out / "data"), splits, str(out / "summary.json"))
    assert len(rows.read(out / "data")) == 320

    client = mlflow.MlflowClient()
    children = {r.data.tags["medtune.step"]: r for r in client.search_runs(
        [client.get_run(run_id).info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")}
    val = children["validate_data"]
    assert val.data.metrics["rows_quarantined"] == 1 and val.data.metrics["quarantined.not_json"] == 1
    logged = {a.path for a in client.list_artifacts(val.info.run_id, "validation")}
    assert {"validation/data_docs.html", "validation/expectation_suite.json",
            "validation/quarantine.jsonl"} <= logged
    inputs = {d.dataset.name: d for d in children["preprocess"].inputs.dataset_inputs}
    for name in ("train", "validation", "test"):
        fp = prepared["splits"][name]["fingerprint"]
        assert inputs[f"medqa-{name}"].dataset.digest == fp[:36]
        tags = {t.key: t.value for t in inputs[f"medqa-{name}"].tags}
        assert tags["sha256"] == fp and tags["rows"] == str(prepared["splits"][name]["rows"])
