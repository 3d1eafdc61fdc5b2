"""Personal data never leaves validation unmasked (issue 20): crafted rows plant an SSN and an e-mail
address where each rule echoes values; every output file, the log and the MLflow run's artifacts are
scanned for them. The raw quarantine is the one exception: a local file only its owner can read."""

from __future__ import annotations

import json
import logging
import re
import stat
from pathlib import Path

import mlflow
import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT, open_sqlite_run
from medtune import phi
from medtune.steps import validate_data
from medtune.cli import app

SSN, EMAIL = "123-45-6789", "jane.doe@example.com"
PLANTED = (SSN.encode(), EMAIL.encode(), b"jane.doe")


def crafted(path: Path) -> Path:
    good = [json.dumps({"question": f"What is condition number {i}?", "answer": f"Condition {i} is a disease."})
            for i in range(80)]
    bad = [
        # fails question.length_chars first: GX echoes the whole value
        json.dumps({"question": f"What about {SSN} and {EMAIL}? " + "x" * 1000, "answer": "An answer."}),
        # fails question.is_text first: the other cells still carry PHI into the quarantine
        json.dumps({"question": 12345, "answer": f"Mail {EMAIL}, SSN {SSN}."}),
        # blocked by the PHI rule itself
        json.dumps({"question": "What is my number?", "answer": f"It is {SSN}."}),
        # not JSON at all: the raw line goes to the quarantine
        '{"question": "What is ' + SSN + '", "ans',
        # markup in a failing cell
        json.dumps({"question": "What is <script>alert(1)</script>?" + "x" * 1000, "answer": "Nothing."}),
        # control character first, PHI after it
        json.dumps({"question": f"What is\x00 {EMAIL}?", "answer": "A thing."}),
        # duplicate key, PHI in the key itself
        '{"question": "Who is it?", "answer": "A", "answer": "B", "' + EMAIL + '": 1}',
        # not in the allowed set, PHI in the value
        json.dumps({"question": "What is the source?", "answer": "A source.", "source": f"from {EMAIL}"}),
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(good + bad) + "\n")
    return path


def leaks(root: Path, skip: tuple[str, ...] = ()) -> dict[str, list[bytes]]:
    found = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.name not in skip):
        hits = [s for s in PLANTED if s in file.read_bytes()]
        if hits:
            found[str(file.relative_to(root))] = hits
    return found


def test_cli_outputs_and_messages_hold_no_planted_phi(tmp_path, caplog):
    data = crafted(tmp_path / "data" / "qa.jsonl")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(app, ["data", "validate", str(data.parent), "--out", str(out), "--config",
                                          str(ROOT / "configs" / "local.yaml"), "--set", "data.min_kept_fraction=0.5",
                                          "--set", "data.allowed_values.source=[medquad]"])
    assert result.exit_code == 0, result.output
    assert "rows read 88, kept 80, quarantined 8" in result.output
    report = json.loads((out / "validation.json").read_text())["summary"]
    assert report["quarantined_by_rule"] == {
        "question.length_chars": 2, "question.is_text": 1, "answer.phi_ssn": 1, "not_json": 1,
        "question.control_chars": 1, "duplicate_key": 1, "source.allowed_values": 1}
    assert leaks(out, skip=("quarantine.raw.jsonl",)) == {}
    assert not any(s.decode() in result.output + caplog.text for s in PLANTED)
    html = (out / "data_docs.html").read_text()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script>alert" not in html
    raw = out / "quarantine.raw.jsonl"
    assert stat.S_IMODE(raw.stat().st_mode) == 0o600
    assert SSN.encode() in raw.read_bytes() and EMAIL.encode() in raw.read_bytes()  # the scan can find them
    assert len(raw.read_text().splitlines()) == len((out / "quarantine.jsonl").read_text().splitlines()) == 8


@pytest.mark.parametrize("log_raw", [False, True])
def test_mlflow_run_artifacts_hold_no_planted_phi_unless_raw_logging_is_asked_for(tmp_path, log_raw):
    data = crafted(tmp_path / "qa.jsonl")
    tree = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    tree["data"].update(path=str(data), min_kept_fraction=0.5, log_raw_quarantine=log_raw)
    cfg_json, run_id = open_sqlite_run(tree, tmp_path, "privacy")
    out = tmp_path / "out"
    summary = validate_data.run(cfg_json, run_id, str(out / "data"), str(out / "quarantine.jsonl"),
                                  str(out / "validation.json"), str(out / "docs.html"))
    assert summary["rows_read"] == summary["rows_kept"] + summary["rows_quarantined"] == 88
    assert leaks(out, skip=("quarantine.raw.jsonl",)) == {}

    client = mlflow.MlflowClient()
    (child,) = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run_id}'")
    logged = tmp_path / "logged"
    for run in (run_id, child.info.run_id):
        mlflow.artifacts.download_artifacts(run_id=run, dst_path=str(logged / run))
    names = {p.name for p in logged.rglob("*") if p.is_file()}
    assert "<script>alert" not in next(logged.rglob("data_docs.html")).read_text()
    assert {"quarantine.jsonl", "validation.json", "data_docs.html"} <= names
    assert ("quarantine.raw.jsonl" in names) == log_raw
    found = leaks(logged)
    if log_raw:  # asked for: only the raw quarantine holds the values
        assert set(found) == {f"{child.info.run_id}/validation/quarantine.raw.jsonl"}
    else:
        assert found == {}
    params = json.dumps(child.data.params | client.get_run(run_id).data.params)
    assert not any(s.decode() in params for s in PLANTED)


def test_redact_masks_what_straddles_the_cut_escapes_controls_and_bounds_length():
    text = "a" * 195 + f" {SSN} and more " + "b" * 10_000
    shown = phi.redact(text, 200)
    assert SSN not in shown and "[SSN]" in shown and "45-67" not in shown
    assert shown.endswith(f"...[{len(text) - len('a' * 195 + ' ' + SSN)} more characters]")
    assert phi.redact("bell\x07 esc\x1b[0m nul\x00 tab\tnl\n") == "bell\\x07 esc\\x1b[0m nul\\x00 tab\tnl\n"
    assert phi.redact_tree({EMAIL: [f"write to {EMAIL}"]}) == {"[EMAIL]": ["write to [EMAIL]"]}


def _leading_repeat_unguarded(pattern: str) -> bool:
    """True when the pattern opens with an unbounded repeat that no negative look-behind anchors: the
    engine then retries the repeat from every position of a long run, O(n^2) in the text's length."""
    from re import _constants as c
    from re import _parser

    guarded = False
    for op, arg in _parser.parse(pattern):
        if op is c.ASSERT_NOT and arg[0] == -1:  # (?<!...)
            guarded = True
            continue
        if op in (c.AT, c.ASSERT, c.ASSERT_NOT):
            continue
        return op in (c.MAX_REPEAT, c.MIN_REPEAT) and arg[1] is c.MAXREPEAT and not guarded
    return False


def test_masking_patterns_have_no_quadratic_opening():
    # the e-mail mask before issue 20 opened with an unguarded [\w.+-]+ (20k characters: over a second)
    assert _leading_repeat_unguarded(r"[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
    for kind in phi.KINDS:
        assert not _leading_repeat_unguarded(phi._MASK[kind].pattern), kind
        assert not _leading_repeat_unguarded(phi._SCAN[kind].pattern), kind
    assert re.fullmatch(r"(?:\[EMAIL\] )+", phi.mask(f"{EMAIL} " * 3))
