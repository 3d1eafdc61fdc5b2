"""Crafted inputs (issue 20): each ends in a DataError naming the file (and line or member), or in a
quarantine whose counts add up (rows read = kept + quarantined). Every file is made here, in tmp_path."""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from medtune.config import DataConfig
from medtune.ingest import DataError, ingest
from medtune.validate import validate

GOOD = {"question": "What is asthma exactly?", "answer": "A long-term disease of the airways."}


def jsonl(rows: list[dict]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


def good_rows(n: int) -> list[dict]:
    return [{"question": f"What is condition number {i}?", "answer": f"Condition {i} is a disease."} for i in range(n)]


def tar_gz(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def conserved(out) -> None:
    assert out.summary["rows_read"] == out.summary["rows_kept"] + out.summary["rows_quarantined"]


@pytest.mark.parametrize("name, content, expected", [
    ("data.tar.gz", b"just some text, not an archive\n" * 10, "not a readable tar archive"),
    ("data.tar.gz", gzip.compress(b"gzip, but no tar inside\n" * 10), "not a readable tar archive"),
    ("MedQuAD-x.tar.gz", b"not gzip at all", "not a readable tar archive"),
    ("MedQuAD-x.tar.gz", gzip.compress(b"gzip, no tar"), "not a readable tar archive"),
    ("data.zip", b"PK but not a zip", "not a readable zip archive"),
    ("rows.jsonl.gz", b"not gzip" * 20, "cannot be read to the end"),
])
def test_archive_that_is_not_what_its_name_says_is_a_data_error(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as err:
        ingest(DataConfig(path=str(path)))
    assert str(path) in str(err.value)


def test_truncated_archive_is_a_data_error_naming_it(tmp_path):
    whole = tar_gz(tmp_path / "whole.tar.gz", {"rows.jsonl": jsonl(good_rows(3000))}).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.tar\.gz") as err:
        ingest(DataConfig(path=str(cut)))
    assert "truncated" in str(err.value) or "not a readable tar" in str(err.value)
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl(good_rows(3000)))[:2000])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz.*truncated"):
        ingest(DataConfig(path=str(gz)))


def test_json_nested_100k_deep_is_quarantined_and_alone_stops_the_file(tmp_path):
    deep = b'{"question": ' + b"[" * 100_000 + b"]" * 100_000 + b', "answer": "x"}'
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(jsonl(good_rows(5)) + deep + b"\n" + b'{"question": ' + b"[" * 40 + b"]" * 40 + b"}\n")
    out = validate(DataConfig(path=str(mixed)))
    conserved(out)
    assert out.summary["rows_read"] == 7 and out.summary["quarantined_by_rule"] == {"too_deep": 2}
    assert sorted(q["line"] for q in out.quarantine) == [6, 7]
    alone = tmp_path / "deep.jsonl"
    alone.write_bytes(deep + b"\n")
    with pytest.raises(DataError, match=r"deep\.jsonl: 1 of 1 lines could not be decoded \(first: line 1"):
        ingest(DataConfig(path=str(alone)))


def test_csv_field_over_the_csv_module_default_is_read_and_bounded_by_max_row_bytes(tmp_path):
    path = tmp_path / "long.csv"
    long = "x" * 131_073
    path.write_text("question,answer\n" + "".join(f"What is item {i}?,Item {i} is fine.\n" for i in range(4))
                    + f"What is the long one?,{long}\n")
    out = validate(DataConfig(path=str(path)))
    conserved(out)
    assert out.summary["quarantined_by_rule"] == {"answer.length_chars": 1}
    with pytest.raises(DataError, match=r"long\.csv line 6: field larger than field limit.*max_row_bytes=100000"):
        ingest(DataConfig(path=str(path), max_row_bytes=100_000))


def test_zip_jsonl_gz_and_tsv_are_read_next_to_jsonl(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl(good_rows(2)))
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(jsonl(good_rows(3))))
    (tmp_path / "c.tsv").write_text("question\tanswer\nWhat is gout, then?\tArthritis, with a comma.\n")
    with zipfile.ZipFile(tmp_path / "d.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("inner/e.csv", "question,answer\nWhat is a cold?,A viral infection.\n")
        zf.writestr("inner/f.jsonl", jsonl(good_rows(4)))
    tar_gz(tmp_path / "g.tar.gz", {"h.jsonl": jsonl(good_rows(5))})
    out = ingest(DataConfig(path=str(tmp_path)))
    assert [f.removeprefix(str(tmp_path) + "/") for f in out.files] == [
        "a.jsonl", "b.jsonl.gz", "c.tsv", "d.zip:inner/e.csv", "d.zip:inner/f.jsonl", "g.tar.gz:h.jsonl"]
    assert len(out.rows) == 2 + 3 + 1 + 1 + 4 + 5 and out.quarantine == []
    assert out.rows[5]["answer"] == "Arthritis, with a comma."
    assert out.rows[6]["_file"] == f"{tmp_path}/d.zip:inner/e.csv" and out.rows[6]["_line"] == 2


def test_duplicate_csv_columns_are_refused_and_duplicate_json_keys_quarantined(tmp_path):
    csv_path = tmp_path / "dup.csv"
    csv_path.write_text("question,answer,answer\nWhat is gout?,Arthritis.,Something else.\n")
    with pytest.raises(DataError, match=r"dup\.csv: column\(s\) \['answer'\] appear more than once"):
        ingest(DataConfig(path=str(csv_path)))
    json_path = tmp_path / "dup.jsonl"
    json_path.write_bytes(jsonl(good_rows(3)) + b'{"question": "What is gout?", "answer": "A", "answer": "B"}\n')
    out = validate(DataConfig(path=str(json_path)))
    conserved(out)
    (bad,) = out.quarantine
    assert (bad["line"], bad["rule"]) == (4, "duplicate_key") and "['answer']" in bad["detail"]


def test_files_in_a_folder_it_cannot_read_are_listed_and_refused(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(jsonl(good_rows(2)))
    (tmp_path / "notes.txt").write_text("not data")
    os.mkfifo(tmp_path / "pipe.jsonl")  # would block a reader forever
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "rows.xlsx").write_bytes(b"PK")
    with pytest.raises(DataError, match=r"3 file\(s\) here cannot be read as data") as err:
        ingest(DataConfig(path=str(tmp_path)))
    message = str(err.value)
    assert f"{tmp_path}/notes.txt: not a format medtune reads" in message
    assert f"{tmp_path}/pipe.jsonl: not a regular file" in message and f"{tmp_path}/sub/rows.xlsx" in message


def test_links_out_of_the_data_folder_are_refused_and_links_inside_reported(tmp_path):
    data, outside = tmp_path / "data", tmp_path / "secret.jsonl"
    data.mkdir()
    outside.write_bytes(jsonl(good_rows(1)))
    (data / "a.jsonl").write_bytes(jsonl(good_rows(2)))
    (data / "again.jsonl").symlink_to(data / "a.jsonl")
    (data / ".git").mkdir()
    (data / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    out = ingest(DataConfig(path=str(data)))
    assert len(out.rows) == 2 and out.skipped == {str(data / "again.jsonl"): f"link to {data}/a.jsonl, read there",
                                                  str(data / ".git"): "hidden"}
    (data / "leak.jsonl").symlink_to(outside)
    (data / "etc").symlink_to("/etc")
    with pytest.raises(DataError, match="2 file") as err:
        ingest(DataConfig(path=str(data)))
    assert f"leak.jsonl: link to {outside}, outside the data folder" in str(err.value)
    assert "etc: link to /etc, outside the data folder" in str(err.value)
    xml = tmp_path / "medquad"
    (xml / "1_CancerGov_QA").mkdir(parents=True)
    (xml / "1_CancerGov_QA" / "a.xml").symlink_to(outside)
    with pytest.raises(DataError, match=r"a\.xml: link to .*secret\.jsonl, outside the data folder"):
        ingest(DataConfig(path=str(xml)))


def test_tar_link_and_device_members_are_counted_and_refused(tmp_path):
    path = tmp_path / "links.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        data = jsonl(good_rows(2))
        info = tarfile.TarInfo("rows.jsonl")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for name, kind in [("s1.jsonl", tarfile.SYMTYPE), ("s2.jsonl", tarfile.SYMTYPE),
                           ("h.jsonl", tarfile.LNKTYPE), ("dev", tarfile.CHRTYPE)]:
            member = tarfile.TarInfo(name)
            member.type, member.linkname = kind, "/etc/passwd" if kind == tarfile.SYMTYPE else "rows.jsonl"
            tar.addfile(member)
    with pytest.raises(DataError) as err:
        ingest(DataConfig(path=str(path)))
    message = str(err.value)
    assert message.startswith(f"{path}: members medtune does not read, so nothing was read from it")
    assert "3 link member(s) (e.g. s1.jsonl, s2.jsonl, h.jsonl)" in message and "1 device or pipe member(s)" in message


def test_archive_member_count_and_size_caps(tmp_path):
    many = tmp_path / "many.zip"
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(5):
            zf.writestr(f"r{i}.jsonl", jsonl(good_rows(1)))
    with pytest.raises(DataError, match=r"many\.zip: 5 members or more, over data.max_archive_members=3"):
        ingest(DataConfig(path=str(many), max_archive_members=3))
    bomb = tar_gz(tmp_path / "bomb.tar.gz", {"big.jsonl": b" " * 5_000_000 + jsonl(good_rows(1))})
    assert bomb.stat().st_size < 20_000
    with pytest.raises(DataError, match=r"bomb\.tar\.gz: .*member\(s\) over data.max_file_bytes=1000000"):
        ingest(DataConfig(path=str(bomb), max_file_bytes=1_000_000))
    gz = tmp_path / "bomb.jsonl.gz"  # a gzip's own size field can lie: the stream is counted as it is read
    gz.write_bytes(gzip.compress(b"\n" * 5_000_000 + jsonl(good_rows(1))))
    with pytest.raises(DataError, match=r"bomb\.jsonl\.gz: more than data.max_file_bytes=1000000 bytes"):
        ingest(DataConfig(path=str(gz), max_file_bytes=1_000_000))


def test_a_50_mb_line_is_quarantined_unread_and_echoes_stay_small(tmp_path):
    path = tmp_path / "huge.jsonl"
    with path.open("wb") as fh:
        fh.write(jsonl(good_rows(10)))
        fh.write(b'{"question": "What is huge?", "answer": "' + b"y" * 50_000_000 + b'"}\n')
        fh.write(b'{"question": "What is long?", "answer": "' + b"z 123-45-6789 " * 40_000 + b'"}\n')
    out = validate(DataConfig(path=str(path)))
    conserved(out)
    assert out.summary["quarantined_by_rule"] == {"row_too_large": 1, "answer.length_chars": 1}
    big = next(q for q in out.quarantine if q["rule"] == "row_too_large")
    assert big["line"] == 11 and "line of 50000043 bytes" in big["detail"] and len(big["row"]["raw"]) == 1024
    report = json.dumps(out.gx_result)
    assert len(report) < 200_000 and "123-45-6789" not in report and len(out.docs_html) < 2_000_000


def test_control_characters_are_quarantined_and_tabs_and_newlines_kept(tmp_path):
    path = tmp_path / "ctl.jsonl"
    rows = good_rows(6) + [
        {"question": "What is\x00 a NUL?", "answer": "A byte."},
        {"question": "What is an escape?", "answer": "\x1b[31mred\x1b[0m text"},
        {"question": "What rings a bell?", "answer": "This\x07 does."},
        {"question": "What is\ttabbed?", "answer": "Lines\nand\r\nmore lines."},
    ]
    path.write_bytes(jsonl(rows))
    out = validate(DataConfig(path=str(path)))
    conserved(out)
    assert out.summary["quarantined_by_rule"] == {"answer.control_chars": 2, "question.control_chars": 1}
    details = {q["line"]: q["detail"] for q in out.quarantine}
    assert details[7] == "field 'question' holds control character \\x00 at character 8"
    assert details[9] == "field 'answer' holds control character \\x07 at character 5"
    assert len(out.kept) == 7


@pytest.mark.parametrize("name, body", [
    ("bom.jsonl", b"\xef\xbb\xbf" + jsonl(good_rows(3))),
    ("bom.csv", b"\xef\xbb\xbfquestion,answer\nWhat is gout?,Arthritis.\nWhat is a cold?,An infection.\n"),
    ("bom.tsv", b"\xef\xbb\xbfquestion\tanswer\nWhat is gout?\tArthritis.\n"),
])
def test_utf8_bom_does_not_cost_row_one(tmp_path, name, body):
    path = tmp_path / name
    path.write_bytes(body)
    out = validate(DataConfig(path=str(path)))
    assert out.summary["rows_quarantined"] == 0 and out.summary["rows_kept"] == body.count(b"\n") - name.endswith("sv")
