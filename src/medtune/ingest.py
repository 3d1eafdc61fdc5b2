"""Read question/answer pairs from JSONL, CSV, Parquet or MedQuAD XML into canonical rows.

Every row carries where it came from (`_file`, `_line`) so a rejected row can be traced back. Rows that
cannot even be decoded go to the quarantine list instead of stopping the load; a file that is mostly
undecodable stops it, because then the problem is the file, not a row.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from medtune.config import DataConfig

# MedQuAD's publishers removed the answers of these subsets for copyright reasons.
MEDQUAD_ANSWERLESS_SUBSETS = ("10_MPlus_ADAM_QA", "11_MPlusDrugs_QA", "12_MPlusHerbsSupplements_QA")
TABULAR_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
MAX_BAD_LINE_FRACTION = 0.5


class DataError(ValueError):
    """Input that cannot be used; the message names the file (and row and field where there is one)."""


@dataclass
class Ingested:
    rows: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    @property
    def read(self) -> int:
        return len(self.rows) + len(self.quarantine)


def quarantine_record(row: dict, file: str, line: int | None, rule: str, detail: str) -> dict:
    return {"file": file, "line": line, "rule": rule, "detail": detail, "row": row}


def ingest(cfg: DataConfig) -> Ingested:
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    out = Ingested()
    for file, fmt in _sources(path, cfg.format):
        out.files.append(str(file))
        if fmt == "medquad":
            _read_medquad(file, out)
        else:
            _read_tabular(file, fmt, cfg, out)
        if cfg.limit and len(out.rows) >= cfg.limit:
            out.rows = out.rows[: cfg.limit]
            break
    if not out.files:
        raise DataError(f"{path}: no .jsonl, .csv, .parquet or MedQuAD files found")
    return out


def _sources(path: Path, fmt: str) -> Iterator[tuple[Path, str]]:
    if fmt == "medquad" or (fmt == "auto" and _looks_like_medquad(path)):
        yield path, "medquad"
    elif path.is_file():
        yield path, fmt if fmt != "auto" else _format_of(path)
    else:
        for file in sorted(p for p in path.rglob("*") if p.suffix in TABULAR_SUFFIXES):
            yield file, fmt if fmt != "auto" else _format_of(file)


def _looks_like_medquad(path: Path) -> bool:
    if path.is_file():
        return path.name.lower().startswith("medquad") and path.name.endswith((".tar.gz", ".tgz"))
    return any(path.glob("MedQuAD*.tar.gz")) or any(path.rglob("*_QA/*.xml"))


def _format_of(file: Path) -> str:
    try:
        return TABULAR_SUFFIXES[file.suffix.lower()]
    except KeyError:
        raise DataError(f"{file}: unknown format; expected one of {sorted(TABULAR_SUFFIXES)}") from None


def _canonical(raw: dict, cfg: DataConfig, file: Path) -> dict:
    row = {cfg.columns.get(key, key): value for key, value in raw.items()}
    missing = [c for c in ("question", "answer") if c not in row]
    if missing:
        mapping = f" (column mapping: {dict(cfg.columns)})" if cfg.columns else ""
        raise DataError(
            f"{file}: required column(s) {missing} not found; columns present: {sorted(raw)}{mapping}. "
            "Map them with data.columns, e.g. --set data.columns.input=question"
        )
    return row


def _read_tabular(file: Path, fmt: str, cfg: DataConfig, out: Ingested) -> None:
    name = str(file)
    records = list(_decode(file, fmt, out))
    if not records and not out.quarantine:
        raise DataError(f"{file}: the file holds no rows")
    bad = sum(1 for q in out.quarantine if q["file"] == name)
    if bad and bad > MAX_BAD_LINE_FRACTION * (bad + len(records)):
        raise DataError(
            f"{file}: {bad} of {bad + len(records)} lines could not be decoded "
            f"(first: line {next(q['line'] for q in out.quarantine if q['file'] == name)}); the file is mostly bad"
        )
    for line, raw in records:
        row = _canonical(raw, cfg, file)
        row["_file"], row["_line"] = name, line
        out.rows.append(row)


def _decode(file: Path, fmt: str, out: Ingested) -> Iterator[tuple[int, dict]]:
    name = str(file)
    if fmt == "parquet":
        try:
            table = pq.read_table(file)
        except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
            raise DataError(f"{file}: not a readable Parquet file ({exc})") from None
        for index, raw in enumerate(table.to_pylist(), start=1):
            yield index, raw
        return
    data = file.read_bytes()
    if fmt == "csv":
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            raise DataError(f"{file}: line {line} is not valid UTF-8 (byte {exc.start})") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for raw in reader:
            yield reader.line_num, raw
        return
    for number, blob in enumerate(data.splitlines(), start=1):
        if not blob.strip():
            continue
        try:
            raw = json.loads(blob.decode("utf-8"))
        except UnicodeDecodeError as exc:
            out.quarantine.append(quarantine_record({"raw": blob.decode("utf-8", "replace")}, name, number,
                                                    "not_utf8", f"invalid UTF-8 at byte {exc.start}"))
            continue
        except json.JSONDecodeError as exc:
            out.quarantine.append(quarantine_record({"raw": blob.decode("utf-8")}, name, number,
                                                    "not_json", exc.msg))
            continue
        if not isinstance(raw, dict):
            out.quarantine.append(quarantine_record({"raw": raw}, name, number, "not_object",
                                                    "a JSONL row must be an object"))
            continue
        yield number, raw


def _read_medquad(path: Path, out: Ingested) -> None:
    for member, xml_bytes in _medquad_documents(path):
        subset = member.split("/")[-2] if "/" in member else ""
        try:
            doc = ET.fromstring(xml_bytes)
        except ET.ParseError as exc:
            out.quarantine.append(quarantine_record({}, member, None, "not_xml", str(exc)))
            continue
        focus = (doc.findtext("Focus") or "").strip()
        for pair in doc.iter("QAPair"):
            q = pair.find("Question")
            row = {
                "id": q.get("qid") if q is not None else None,
                "question": (q.text or "").strip() if q is not None else "",
                "answer": (pair.findtext("Answer") or "").strip(),
                "focus": focus,
                "qtype": q.get("qtype") if q is not None else None,
                "source": doc.get("source") or subset,
                "_file": member,
                "_line": None,
            }
            if subset in MEDQUAD_ANSWERLESS_SUBSETS and not row["answer"]:
                out.quarantine.append(quarantine_record(row, member, None, "answer_removed_by_publisher",
                                                        f"MedQuAD subset {subset} ships without answers"))
            else:
                out.rows.append(row)


def _medquad_documents(path: Path) -> Iterator[tuple[str, bytes]]:
    archives = [path] if path.is_file() else sorted(path.glob("MedQuAD*.tar.gz"))
    if archives:
        for archive in archives:
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar:
                    if member.isfile() and member.name.endswith(".xml"):
                        yield f"{archive.name}:{member.name}", tar.extractfile(member).read()
    else:
        for file in sorted(path.rglob("*.xml")):
            yield str(file), file.read_bytes()
