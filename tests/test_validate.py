"""Validation: the Great Expectations suite, quarantine reasons, PHI blocking and masking, stop rules."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from conftest import MEDQUAD, SAMPLE
from medtune import phi
from medtune.config import DataConfig, PhiConfig, PreprocessConfig
from medtune.ingest import DataError
from medtune.preprocess import _canonical_frame, _deduplicate
from medtune.validate import ValidationStopped, build_suite, validate, write_outputs


def rows_file(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def qa(n: int, **extra) -> dict:
    return {"question": f"What is condition number {n}?", "answer": f"Condition {n} is a disease.", **extra}


def test_sample_passes_whole_and_counts_add_up():
    result = validate(DataConfig(path=str(SAMPLE)))
    s = result.summary
    assert (s["rows_read"], s["rows_kept"], s["rows_quarantined"], s["suite_success"]) == (320, 320, 0, True)
    assert list(result.kept.columns[:3]) == ["id", "question", "answer"] and "_row" not in result.kept


def test_each_bad_row_is_quarantined_under_its_first_failed_rule(tmp_path):
    rows = [qa(i) for i in range(20)] + [
        {"question": "What is gout, exactly?", "answer": 42},          # wrong type
        {"question": "What is flu, exactly?", "answer": "   "},        # blank
        {"question": "What is a cold, exactly?"},                      # missing
        {"question": "Why?", "answer": "Because."},                    # question too short
        {"question": "What is a cough, exactly?", "answer": "x" * 60},  # answer too long
        {"question": ["a", "list"], "answer": "Lists are not text."},
    ]
    path = rows_file(tmp_path / "a.jsonl", rows)
    result = validate(DataConfig(path=path, max_answer_chars=50))
    got = {(q["line"], q["rule"]): q["detail"] for q in result.quarantine}
    assert got == {
        (21, "answer.is_text"): "field 'answer' is int, expected text",
        (22, "answer.not_blank"): "field 'answer' is empty",
        (23, "answer.not_null"): "field 'answer' is missing",
        (24, "question.length_chars"): "field 'question' has 4 characters (bounds data.min/max_question_chars)",
        (25, "answer.length_chars"): "field 'answer' has 60 characters (bounds data.min/max_answer_chars)",
        (26, "question.is_text"): "field 'question' is list, expected text",
    }
    assert all(q["file"] == path for q in result.quarantine)
    assert result.summary["rows_read"] == 26 == result.summary["rows_kept"] + result.summary["rows_quarantined"]
    assert len(result.kept) == 20


def test_wrong_types_in_parquet_stop_the_run_naming_the_rule(tmp_path):
    path = tmp_path / "typed.parquet"
    pd.DataFrame({"question": ["What is gout, exactly?"] * 3, "answer": [1, 2, 3]}).to_parquet(path)
    with pytest.raises(ValidationStopped) as err:
        validate(DataConfig(path=str(path)))
    message = str(err.value)
    assert "no rows passed validation" in message and "rows read 3, kept 0, quarantined 3" in message
    assert f"answer.is_text: 3 rows, e.g. {path} line 1: field 'answer' is int, expected text" in message
    assert "question: 'What is gout, exactly?'" in message  # an example row is shown
    assert len(err.value.validation.quarantine) == 3


def test_kept_fraction_under_the_floor_stops_the_run(tmp_path):
    path = rows_file(tmp_path / "a.jsonl", [qa(i) for i in range(6)] + [{"question": "Why?", "answer": "x"}] * 4)
    with pytest.raises(ValidationStopped, match=r"kept fraction 0\.60 is under the floor data.min_kept_fraction=0\.7"):
        validate(DataConfig(path=path, min_kept_fraction=0.7))
    assert validate(DataConfig(path=path, min_kept_fraction=0.6)).summary["rows_kept"] == 6


def test_all_lines_undecodable_is_a_data_error(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b"{broken\n")
    with pytest.raises(DataError, match="1 of 1 lines could not be decoded"):
        validate(DataConfig(path=str(path)))


def test_allowed_values_of_categorical_fields(tmp_path):
    path = rows_file(tmp_path / "a.jsonl", [qa(0, qtype="symptoms"), qa(1, qtype="treatment"), qa(2, qtype="gossip")])
    result = validate(DataConfig(path=path, allowed_values={"qtype": ["symptoms", "treatment"]}))
    assert [(q["line"], q["rule"], q["detail"]) for q in result.quarantine] == [
        (3, "qtype.allowed_values", "field 'qtype' is 'gossip', not one of data.allowed_values.qtype")]


def test_token_bounds_use_the_model_tokenizer(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = [qa(0), {"question": "What is type 2 diabetes?",
                    "answer": "Type 2 diabetes is a long-term condition in which the body does not use insulin."}]
    path = rows_file(tmp_path / "a.jsonl", rows)
    counts = [len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert counts[0] < 10 < counts[1]
    result = validate(DataConfig(path=path, max_answer_tokens=10, min_kept_fraction=0.5), tokenizer)
    assert [(q["line"], q["rule"], q["detail"]) for q in result.quarantine] == [
        (2, "answer.length_tokens", f"field 'answer' has {counts[1]} tokens (bound data.max_answer_tokens)")]
    with pytest.raises(DataError, match="no tokenizer"):
        validate(DataConfig(path=path, max_answer_tokens=10))


PHI_TEXTS = {
    "email": "Write to jane.doe+clinic@example-mail.com for results.",
    "phone": "Call the patient at (415) 555-0134 tomorrow.",
    "ssn": "Her SSN is 123-45-6789.",
    "mrn": "Patient MRN: 00482913 was admitted.",
    "dob": "DOB: 04/12/1961, female.",
}
NOT_PHI = ["In 1961, 12 of 45 patients improved.", "Take 200-400 mg twice daily.", "Born in 1950 in Ohio.",
           "Gene at 17q21.31; ICD-10 E11.9.", "Date of birth is recorded at admission.", "Email the clinic."]


@pytest.mark.parametrize("kind", phi.KINDS)
def test_phi_scan_and_mask_patterns_agree(kind):
    text = PHI_TEXTS[kind]
    assert phi.find(text) == [kind]
    masked = phi.mask(text)
    assert phi.PLACEHOLDER[kind] in masked and phi.find(masked) == []
    for other in ("1-800-784-8669", "+1 301 496 5248", "301.496.5248"):
        assert phi.find(other) == ["phone"] and phi.mask(other) == "[PHONE]"


def test_ordinary_medical_numbers_are_not_phi():
    assert [phi.find(t) for t in NOT_PHI] == [[]] * len(NOT_PHI)


def test_phi_blocks_rows_without_echoing_the_value(tmp_path):
    rows = [qa(i) for i in range(10)] + [qa(10 + i, answer=t) for i, t in enumerate(PHI_TEXTS.values())]
    rows.append({"question": "Is 123-45-6789 my number?", "answer": "Do not share it."})
    path = rows_file(tmp_path / "a.jsonl", rows)
    result = validate(DataConfig(path=path))
    assert [(q["line"], q["rule"]) for q in result.quarantine] == [
        (11, "answer.phi_email"), (12, "answer.phi_phone"), (13, "answer.phi_ssn"), (14, "answer.phi_mrn"),
        (15, "answer.phi_dob"), (16, "question.phi_ssn")]
    ssn = result.quarantine[2]["detail"]
    assert ssn.startswith("field 'answer' contains ssn (data.phi.ssn=block)") and "[SSN]" in ssn
    assert "6789" not in ssn
    out = tmp_path / "out"
    write_outputs(result, out / "kept", out / "q.jsonl", out / "report.json", out / "docs.html")
    for name in ("report.json", "docs.html"):
        text = (out / name).read_text()
        assert "123-45-6789" not in text and "555-0134" not in text and "jane.doe" not in text, name


def test_phi_mask_mode_masks_and_reports(tmp_path):
    rows = [qa(0, answer="Call 301-496-5248 or 1-800-784-8669, or mail nihinfo@od.nih.gov."), qa(1)]
    path = rows_file(tmp_path / "a.jsonl", rows)
    result = validate(DataConfig(path=path, phi=PhiConfig(phone="mask", email="mask")))
    assert result.quarantine == [] and result.summary["phi_masked"] == {"phone": 2, "email": 1}
    assert result.kept["answer"][0] == "Call [PHONE] or [PHONE], or mail [EMAIL]."
    off = validate(DataConfig(path=path, phi=PhiConfig(phone="off", email="off")))
    assert off.kept["answer"][0] == rows[0]["answer"]


def test_suite_is_code_and_saved_with_data_docs(tmp_path):
    cfg = DataConfig(path=str(SAMPLE), allowed_values={"qtype": ["information"]}, min_kept_fraction=0.0)
    rules = [e.meta["rule"] for e in build_suite(cfg).expectations]
    assert rules[:5] == ["question.present", "question.not_null", "question.is_text", "question.not_blank",
                         "question.length_chars"]
    assert "qtype.allowed_values" in rules and "answer.phi_ssn" in rules and rules[-1] == "question.unique"
    result = validate(cfg)
    out = tmp_path / "out"
    write_outputs(result, out / "kept", out / "q.jsonl", out / "report.json", out / "docs.html")
    report = json.loads((out / "report.json").read_text())
    assert report["suite"]["name"] == "medtune_qa"
    # the saved suite is the one built for the columns the data has (every kept field is scanned)
    saved = [e["meta"]["rule"] for e in report["suite"]["expectations"]]
    assert saved == [e.meta["rule"] for e in build_suite(cfg, set(result.kept.columns)).expectations]
    assert "source.phi_email" in saved and "focus.control_chars" in saved
    html = (out / "docs.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html and "data_docs_default_styles.css" not in html
    assert "medtune_qa" in html and "values must belong to this set" in html
    quarantined = Counter(json.loads(line)["rule"] for line in (out / "q.jsonl").read_text().splitlines())
    assert quarantined == Counter({"qtype.allowed_values": result.summary["rows_quarantined"]}) and quarantined


@pytest.mark.skipif(not MEDQUAD.exists(), reason="MedQuAD not present")
def test_full_medquad_quarantines_exactly_the_answerless_rows_then_duplicates():
    result = validate(DataConfig(path=str(MEDQUAD), phi=PhiConfig(email="mask", phone="mask")))
    s = result.summary
    assert s["rows_read"] == 47_441 and s["rows_kept"] == 16_407
    assert s["quarantined_by_rule"] == {"answer_removed_by_publisher": 31_029, "answer.not_blank": 5}
    assert s["duplicate_questions"] == 1_428  # exact question text, as MedQuAD's README counts them
    assert s["phi_masked"]["phone"] > 0 and s["kept_fraction"] == pytest.approx(16_407 / 16_412)
    # preprocessing's duplicate rule on the same rows (no tokenizer needed), against the README's counts
    kept, dropped, conflicts = _deduplicate(_canonical_frame(result.kept), PreprocessConfig())
    assert Counter(d["rule"] for d in dropped) == {"duplicate_question_conflicting_answer": 2_014,
                                                   "duplicate_question_same_answer": 48}
    assert len(conflicts) == 1_396 and len(kept) == 16_407 - 2_062
