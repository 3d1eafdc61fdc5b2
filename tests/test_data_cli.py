"""`medtune data validate`: summary on success, a readable reason and exit 1 on bad data, never a traceback."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from conftest import ROOT, SAMPLE
from medtune.cli import app

PROFILE = str(ROOT / "configs" / "local.yaml")


def invoke(*args: str):
    result = CliRunner().invoke(app, ["data", "validate", *args, "--config", PROFILE])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    result.text = " ".join(result.output.split())  # the error console wraps long lines
    return result


def test_validates_a_file_and_writes_quarantine_and_data_docs_next_to_it(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_bytes(SAMPLE.read_bytes() + b'{"question": "What is gout?", "ans\n')
    result = invoke(str(data))
    assert result.exit_code == 0, result.output
    assert "rows read 321, kept 320, quarantined 1" in result.text and "not_json: 1" in result.text
    out = tmp_path / "medtune-validation"
    record = json.loads((out / "quarantine.jsonl").read_text())
    assert (record["file"], record["line"], record["rule"]) == (str(data), 321, "not_json")
    assert "medtune_qa" in (out / "data_docs.html").read_text()
    assert json.loads((out / "validation.json").read_text())["summary"]["rows_kept"] == 320


def test_blocking_failure_exits_1_with_rules_and_still_writes_the_quarantine(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"question": "What is my number?", "answer": "It is 123-45-6789."}\n' * 3)
    result = invoke(str(data), "--out", str(tmp_path / "report"))
    assert result.exit_code == 1
    assert "validation stopped the run: no rows passed validation" in result.text
    assert "answer.phi_ssn: 3 rows" in result.text and "123-45-6789" not in result.text
    lines = (tmp_path / "report" / "quarantine.jsonl").read_text().splitlines()
    assert [json.loads(x)["rule"] for x in lines] == ["answer.phi_ssn"] * 3


@pytest.mark.parametrize("content, expected", [
    (b'{"input": "What is gout?", "output": "Arthritis."}\n', "columns present: ['input', 'output']"),
    (b"", "the file holds no rows"),
    (b"\xff\xfe\x00garbage\n{also bad\n", "2 of 2 lines could not be decoded"),
])
def test_bad_files_exit_1_with_the_reason(tmp_path, content, expected):
    data = tmp_path / "qa.jsonl"
    data.write_bytes(content)
    result = invoke(str(data))
    assert result.exit_code == 1 and expected in result.text


def test_set_overrides_apply_and_bad_keys_are_config_errors(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text('{"input": "What is gout, exactly?", "output": "Arthritis."}\n')
    ok = invoke(str(data), "--set", "data.columns.input=question", "--set", "data.columns.output=answer")
    assert ok.exit_code == 0 and "kept 1" in ok.text
    bad = invoke(str(data), "--set", "data.colums.input=question")
    assert bad.exit_code == 2 and "data.colums" in bad.text


def test_missing_path_is_reported(tmp_path):
    result = invoke(str(tmp_path / "nope.csv"))
    assert result.exit_code == 1 and "no such file or folder" in result.text


def test_folder_output_lands_next_to_it_and_a_rerun_reads_the_same_rows(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "qa.jsonl").write_bytes(SAMPLE.read_bytes())
    first, second = invoke(str(data)), invoke(str(data))
    assert first.exit_code == second.exit_code == 0, second.output
    assert "rows read 320, kept 320" in first.text and "rows read 320, kept 320" in second.text
    assert sorted(p.name for p in data.iterdir()) == ["qa.jsonl"]
    assert (tmp_path / "medtune-validation" / "validation.json").exists()


def test_output_inside_the_data_folder_is_refused_and_an_old_one_there_is_not_read(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "qa.jsonl").write_bytes(SAMPLE.read_bytes())
    inside = invoke(str(data), "--out", str(data / "report"))
    assert inside.exit_code == 2 and "is inside the data folder" in inside.text and not (data / "report").exists()
    old = data / "medtune-validation"  # what earlier versions wrote inside the folder
    (old / "kept").mkdir(parents=True)
    (old / "kept" / "rows.jsonl").write_bytes(SAMPLE.read_bytes())
    (old / "quarantine.jsonl").write_text('{"file": "x", "line": 1, "rule": "not_json"}\n')
    (old / "validation.json").write_text("{}")
    result = invoke(str(data))
    assert result.exit_code == 0 and "rows read 320, kept 320" in result.text
    summary = json.loads((tmp_path / "medtune-validation" / "validation.json").read_text())["summary"]
    assert summary["files_skipped"] == {str(old): "output of medtune data validate"}


def test_truncated_archive_is_an_error_not_aborted(tmp_path):
    import gzip

    data = tmp_path / "qa.jsonl.gz"
    data.write_bytes(gzip.compress(SAMPLE.read_bytes())[:5000])
    result = invoke(str(data))
    assert result.exit_code == 1 and "Aborted" not in result.output
    assert f"{data}: cannot be read to the end" in result.text and "truncated" in result.text
