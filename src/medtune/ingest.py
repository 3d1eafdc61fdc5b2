"""Read question/answer pairs from JSONL, CSV, Parquet, MedQuAD XML or a Hugging Face dataset.

Every row carries where it came from (`_file`, `_line`) so a rejected row can be traced back. Rows that
cannot even be decoded go to the quarantine list instead of stopping the load; a file that is mostly
undecodable stops it, because then the problem is the file, not a row. A required column missing from
a whole file is also a file problem: the message names the file and the columns it does have.
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

from medtune.config import CANONICAL_COLUMNS, DataConfig

# MedQuAD's publishers removed the answers of these subsets for copyright reasons.
MEDQUAD_ANSWERLESS_SUBSETS = ("10_MPlus_ADAM_QA", "11_MPlusDrugs_QA", "12_MPlusHerbsSupplements_QA")
TABULAR_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
REQUIRED = ("question", "answer")
HF_PREFIX = "hf://"


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
    out = Ingested()
    for source, fmt in _sources(cfg):
        out.files.append(str(source))
        if fmt == "medquad":
            _read_medquad(source, out)
        elif fmt == "hf":
            _read_records(source, _hf_records(source, cfg), cfg, out)
        else:
            _read_records(source, _decode(source, fmt, out), cfg, out, max_bad=cfg.max_bad_line_fraction)
        if cfg.limit and len(out.rows) >= cfg.limit:
            out.rows = out.rows[: cfg.limit]
            break
    if not out.files:
        raise DataError(f"{cfg.path}: no .jsonl, .csv, .parquet or MedQuAD files found")
    return out


def _sources(cfg: DataConfig) -> Iterator[tuple[Path | str, str]]:
    if cfg.format == "hf" or cfg.path.startswith(HF_PREFIX):
        yield cfg.path, "hf"
        return
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if cfg.format == "medquad" or (cfg.format == "auto" and _looks_like_medquad(path)):
        yield path, "medquad"
    elif cfg.format == "auto" and _is_saved_dataset(path):
        yield path, "hf"
    elif path.is_file():
        yield path, cfg.format if cfg.format != "auto" else _format_of(path)
    else:
        for file in sorted(p for p in path.rglob("*") if p.suffix.lower() in TABULAR_SUFFIXES):
            yield file, cfg.format if cfg.format != "auto" else _format_of(file)


def _looks_like_medquad(path: Path) -> bool:
    if path.is_file():
        return path.name.lower().startswith("medquad") and path.name.endswith((".tar.gz", ".tgz"))
    return any(path.glob("MedQuAD*.tar.gz")) or any(path.rglob("*_QA/*.xml"))


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _format_of(file: Path) -> str:
    try:
        return TABULAR_SUFFIXES[file.suffix.lower()]
    except KeyError:
        raise DataError(f"{file}: unknown format; expected one of {sorted(TABULAR_SUFFIXES)}") from None


def _column_map(found: set[str], cfg: DataConfig, source: Path | str) -> dict[str, str]:
    """Source column -> canonical column for this file; fails naming the file and what it holds."""
    mapping = {column: cfg.columns.get(column, column) for column in found}
    targets: dict[str, list[str]] = {}
    for column, target in mapping.items():
        if target in CANONICAL_COLUMNS:
            targets.setdefault(target, []).append(column)
    clashes = {t: sorted(cols) for t, cols in targets.items() if len(cols) > 1}
    if clashes:
        raise DataError(f"{source}: several columns map to the same field: {clashes}; "
                        "drop one from data.columns or from the file")
    missing = [c for c in REQUIRED if c not in targets]
    if missing:
        hint = f" (column mapping: {dict(cfg.columns)})" if cfg.columns else ""
        raise DataError(
            f"{source}: required column(s) {missing} not found; columns present: {sorted(found)}{hint}. "
            "Map them with data.columns, e.g. --set data.columns.input=question"
        )
    return mapping


def _read_records(source: Path | str, records: Iterator[tuple[int, dict]], cfg: DataConfig, out: Ingested,
                  max_bad: float = 1.0) -> None:
    name = str(source)
    before = len(out.quarantine)
    records = list(records)
    bad = len(out.quarantine) - before
    if not records and not bad:
        raise DataError(f"{source}: the file holds no rows")
    if bad and bad > max_bad * (bad + len(records)):
        first = out.quarantine[before]
        raise DataError(f"{source}: {bad} of {bad + len(records)} lines could not be decoded (first: line "
                        f"{first['line']}, {first['detail']}); the file is mostly bad, not a few rows")
    if not records:
        return
    found = set().union(*(raw.keys() for _, raw in records))
    mapping = _column_map(found, cfg, source)
    for line, raw in records:
        row = {mapping[key]: value for key, value in raw.items()}
        for column in REQUIRED:
            row.setdefault(column, None)  # a row without the key fails the not-null rule, with its line
        row["_file"], row["_line"] = name, line
        out.rows.append(row)


def _decode(file: Path, fmt: str, out: Ingested) -> Iterator[tuple[int, dict]]:
    if fmt == "parquet":
        return _decode_parquet(file)
    data = file.read_bytes()
    if fmt == "csv":
        return _decode_csv(file, data, out)
    return _decode_jsonl(file, data, out)


def _decode_parquet(file: Path) -> Iterator[tuple[int, dict]]:
    try:
        table = pq.read_table(file)
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{file}: not a readable Parquet file ({exc})") from None
    yield from enumerate(table.to_pylist(), start=1)


def _decode_csv(file: Path, data: bytes, out: Ingested) -> Iterator[tuple[int, dict]]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row is found and quarantined
    # with its line number instead of failing the whole file at the first bad byte.
    text = data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    start = 2
    for raw in reader:
        line, start = start, reader.line_num + 1
        if None in raw:
            out.quarantine.append(quarantine_record(_printable(raw), str(file), line, "csv_extra_fields",
                                                    f"{len(raw[None])} more field(s) than the header"))
            continue
        if any(_has_surrogate(v) for v in raw.values()):
            out.quarantine.append(quarantine_record(_printable(raw), str(file), line, "not_utf8",
                                                    "the row holds bytes that are not valid UTF-8"))
            continue
        yield line, raw


def _has_surrogate(value) -> bool:
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


def _printable(raw: dict) -> dict:
    """The row as it can be written to the quarantine: undecodable bytes shown as U+FFFD."""
    return {str(k): [_readable(x) for x in v] if isinstance(v, list) else _readable(v) for k, v in raw.items()}


def _readable(value):
    if not isinstance(value, str):
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _decode_jsonl(file: Path, data: bytes, out: Ingested) -> Iterator[tuple[int, dict]]:
    name = str(file)
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
                                                    "not_json", f"{exc.msg} at column {exc.colno}"))
            continue
        if not isinstance(raw, dict):
            out.quarantine.append(quarantine_record({"raw": raw}, name, number, "not_object",
                                                    "a JSONL row must be an object"))
            continue
        yield number, raw


def _hf_records(source: Path | str, cfg: DataConfig) -> Iterator[tuple[int, dict]]:
    dataset = _load_hf(source, cfg)
    for index, raw in enumerate(dataset, start=1):
        yield index, raw


def _load_hf(source: Path | str, cfg: DataConfig):
    import datasets

    if isinstance(source, Path):
        try:
            loaded = datasets.load_from_disk(str(source))
        except (FileNotFoundError, ValueError) as exc:
            raise DataError(f"{source}: not a dataset saved with save_to_disk ({exc})") from None
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.hf_split not in loaded:
                raise DataError(f"{source}: no split '{cfg.hf_split}' (data.hf_split); splits: {sorted(loaded)}")
            return loaded[cfg.hf_split]
        return loaded
    repo = source.removeprefix(HF_PREFIX)
    try:
        return datasets.load_dataset(repo, name=cfg.hf_config, split=cfg.hf_split, revision=cfg.hf_revision)
    except Exception as exc:  # network, auth, missing split or revision: all mean "cannot use this source"
        raise DataError(f"{source}: cannot load split '{cfg.hf_split}' at revision {cfg.hf_revision or 'main'} "
                        f"from the Hugging Face Hub: {type(exc).__name__}: {exc}") from None


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
            row = _medquad_row(pair, focus, doc.get("source") or subset, member)
            if subset in MEDQUAD_ANSWERLESS_SUBSETS and not row["answer"]:
                out.quarantine.append(quarantine_record(row, member, None, "answer_removed_by_publisher",
                                                        f"MedQuAD subset {subset} ships without answers"))
            else:
                out.rows.append(row)


def _medquad_row(pair: ET.Element, focus: str, source: str, member: str) -> dict:
    q = pair.find("Question")
    return {
        "id": q.get("qid") if q is not None else None,
        "question": (q.text or "").strip() if q is not None else "",
        "answer": (pair.findtext("Answer") or "").strip(),
        "focus": focus,
        "qtype": q.get("qtype") if q is not None else None,
        "source": source,
        "_file": member,
        "_line": None,
    }


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
