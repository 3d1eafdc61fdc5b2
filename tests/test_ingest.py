"""Ingest: every source format, the column mapping, and undecodable input going to quarantine."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from conftest import MEDQUAD, SAMPLE
from medtune.config import DataConfig
from medtune.ingest import DataError, ingest

GOOD = {"question": "What is asthma exactly?", "answer": "A long-term disease of the airways."}


def write_jsonl(path: Path, rows: list, extra_lines: dict[int, bytes] | None = None) -> Path:
    lines = [json.dumps(r).encode() for r in rows]
    for index, blob in (extra_lines or {}).items():
        lines.insert(index, blob)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_sample_jsonl_rows_carry_file_and_line():
    out = ingest(DataConfig(path=str(SAMPLE)))
    assert len(out.rows) == 320 and out.quarantine == []
    assert out.rows[0]["_file"] == str(SAMPLE) and out.rows[0]["_line"] == 1
    assert out.rows[-1]["_line"] == 320 and out.rows[0]["id"] == "s0001"


def test_column_mapping_loads_alpaca_style_rows(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "input": "What is gout?", "output": "Arthritis."}])
    mapping = {"input": "question", "output": "answer", "instruction": "context"}
    out = ingest(DataConfig(path=str(path), columns=mapping))
    assert out.rows[0]["question"] == "What is gout?" and out.rows[0]["answer"] == "Arthritis."
    assert out.rows[0]["context"] == "x"


def test_unmapped_required_column_names_file_and_found_columns(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"input": "What is gout?", "output": "Arthritis."}])
    with pytest.raises(DataError) as err:
        ingest(DataConfig(path=str(path)))
    message = str(err.value)
    assert str(path) in message and "['question', 'answer'] not found" in message
    assert "columns present: ['input', 'output']" in message and "data.columns" in message


def test_two_columns_mapped_to_one_field_fail(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"input": "What is gout?", "question": "q", "answer": "a"}])
    clash = r"several columns map to the same field: \{'question': \['input', 'question'\]\}"
    with pytest.raises(DataError, match=clash):
        ingest(DataConfig(path=str(path), columns={"input": "question"}))


def test_row_without_a_key_is_kept_for_the_not_null_rule(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, {"question": "What is gout, really?"}])
    out = ingest(DataConfig(path=str(path)))
    assert out.rows[1]["answer"] is None and out.rows[1]["_line"] == 2


def test_truncated_json_line_is_quarantined_with_its_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 5, {2: b'{"question": "What is gout?", "answ'})
    out = ingest(DataConfig(path=str(path)))
    assert len(out.rows) == 5 and len(out.quarantine) == 1
    bad = out.quarantine[0]
    assert (bad["file"], bad["line"], bad["rule"]) == (str(path), 3, "not_json")
    assert "Unterminated string" in bad["detail"] and bad["row"]["raw"].startswith('{"question"')
    assert [r["_line"] for r in out.rows] == [1, 2, 4, 5, 6]


def test_invalid_utf8_line_is_quarantined_not_fatal(tmp_path):
    latin1 = json.dumps({"question": "Qu'est-ce que la fièvre ?", "answer": "Température élevée."},
                        ensure_ascii=False).encode("latin-1")
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD] * 3, {1: latin1})
    out = ingest(DataConfig(path=str(path)))
    assert [(q["line"], q["rule"]) for q in out.quarantine] == [(2, "not_utf8")]
    assert "invalid UTF-8 at byte" in out.quarantine[0]["detail"] and len(out.rows) == 3


def test_non_object_json_line_is_quarantined(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD, GOOD, ["a", "list"]])
    out = ingest(DataConfig(path=str(path)))
    assert [(q["line"], q["rule"]) for q in out.quarantine] == [(3, "not_object")]


def test_one_bad_line_in_40000_does_not_stop_the_load(tmp_path):
    path = write_jsonl(tmp_path / "big.jsonl", [GOOD] * 40_000, {20_000: b"{not json"})
    out = ingest(DataConfig(path=str(path)))
    assert len(out.rows) == 40_000 and [q["line"] for q in out.quarantine] == [20_001]


def test_mostly_bad_file_stops_the_load(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [GOOD], {0: b"{x", 1: b"{y", 2: b"\xff\xfe"})
    with pytest.raises(DataError) as err:
        ingest(DataConfig(path=str(path)))
    assert f"{path}: 3 of 4 lines could not be decoded (first: line 1" in str(err.value)
    assert "mostly bad" in str(err.value)


def test_empty_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=f"{path}: the file holds no rows"):
        ingest(DataConfig(path=str(path)))


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        ingest(DataConfig(path=str(tmp_path / "nope.jsonl")))


def test_csv_with_a_latin1_row_quarantines_that_row(tmp_path):
    path = tmp_path / "a.csv"
    path.write_bytes(b"question,answer\n"
                     b"What is gout?,Arthritis.\n"
                     b"\"What is fever, \xe9lev\xe9e?\",\"Hot.\"\n"
                     b"\"What is\nflu?\",A virus.\n"
                     b"What is a cold?,A virus,extra\n")
    out = ingest(DataConfig(path=str(path)))
    assert [(r["question"], r["_line"]) for r in out.rows] == [("What is gout?", 2), ("What is\nflu?", 4)]
    assert [(q["line"], q["rule"]) for q in out.quarantine] == [(3, "not_utf8"), (6, "csv_extra_fields")]
    assert "\ufffd" in out.quarantine[0]["row"]["question"]


def test_parquet_round_trip_and_not_a_parquet_file(tmp_path):
    good = tmp_path / "good.parquet"
    pd.DataFrame([GOOD, GOOD]).to_parquet(good)
    assert [r["_line"] for r in ingest(DataConfig(path=str(good))).rows] == [1, 2]
    fake = tmp_path / "fake.parquet"
    fake.write_text("question,answer\n")
    with pytest.raises(DataError, match=f"{fake}: not a readable Parquet file"):
        ingest(DataConfig(path=str(fake)))


def test_folder_reads_every_format_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [GOOD])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.csv").write_text("question,answer\nWhat is gout?,Arthritis.\n")
    pd.DataFrame([GOOD]).to_parquet(tmp_path / "a.parquet")
    out = ingest(DataConfig(path=str(tmp_path)))
    assert [Path(f).name for f in out.files] == ["a.parquet", "b.jsonl", "c.csv"]
    assert len(out.rows) == 3


def test_dataset_saved_with_save_to_disk_loads_the_configured_split(tmp_path):
    import datasets

    rows = {"input": ["What is gout?", "What is flu?"], "output": ["Arthritis.", "A virus."]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                          "test": datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()})}
                         ).save_to_disk(tmp_path / "ds")
    cfg = {"path": str(tmp_path / "ds"), "columns": {"input": "question", "output": "answer"}}
    out = ingest(DataConfig(**cfg, hf_split="test"))
    assert [(r["question"], r["answer"], r["_line"]) for r in out.rows] == [("What is gout?", "Arthritis.", 1)]
    assert len(ingest(DataConfig(**cfg)).rows) == 2
    with pytest.raises(DataError, match=r"no split 'dev' \(data.hf_split\); splits: \['test', 'train'\]"):
        ingest(DataConfig(**cfg, hf_split="dev"))


def test_hub_dataset_id_that_cannot_be_reached_is_a_clear_error(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        ingest(DataConfig(path="hf://medalpaca/medical_meadow_wikidoc", hf_revision="v1.0"))
    message = str(err.value)
    assert message.startswith("hf://medalpaca/medical_meadow_wikidoc: cannot load split 'train' at revision v1.0")


def test_limit_keeps_the_first_rows():
    assert len(ingest(DataConfig(path=str(SAMPLE), limit=7)).rows) == 7


@pytest.mark.skipif(not MEDQUAD.exists(), reason="MedQuAD not present")
def test_full_medquad_archive_counts_match_its_readme():
    out = ingest(DataConfig(path=str(MEDQUAD)))
    assert out.read == 47_441
    assert {q["rule"] for q in out.quarantine} == {"answer_removed_by_publisher"}
    assert len(out.quarantine) == 31_029
    assert sum(1 for r in out.rows if not r["answer"]) == 5  # GARD's empty answers: for the validator
    subsets = {q["file"].split("/")[-2] for q in out.quarantine}
    assert subsets == {"10_MPlus_ADAM_QA", "11_MPlusDrugs_QA", "12_MPlusHerbsSupplements_QA"}
    assert all(r["focus"] is not None and r["source"] for r in out.rows)
