"""Read question/answer pairs from JSONL, CSV/TSV, Parquet (plain, .gz, or inside .zip/.tar archives),
MedQuAD XML or a Hugging Face dataset.

Every row carries where it came from (`_file`, `_line`) so a rejected row can be traced back. Rows that
cannot even be decoded go to the quarantine list instead of stopping the load; a file that is mostly
undecodable stops it, because then the problem is the file, not a row. A required column missing from
a whole file is also a file problem: the message names the file and the columns it does have.

Nothing is skipped without a word: in a folder, a file medtune cannot read (unknown format, not a regular
file, a link leading out of the folder) stops the load with the full list; archive members that are links
or devices are refused the same way. Reads stream, bounded by `data.max_file_bytes` per file or member,
`data.max_archive_members` and `data.max_row_bytes` per line, so a small archive cannot expand into
memory. A broken stream (truncated archive, gzip that is not gzip) is a `DataError` naming the file.
Echoed values (column names in messages, quarantined rows) are redacted later, never here: the raw
quarantine is what the restricted local artifact keeps.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import gzip
import io
import json
import os
import stat
import tarfile
import xml.etree.ElementTree as ET
import zipfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pyarrow.parquet as pq

from medtune import phi
from medtune.config import CANONICAL_COLUMNS, DataConfig

# MedQuAD's publishers removed the answers of these subsets for copyright reasons.
MEDQUAD_ANSWERLESS_SUBSETS = ("10_MPlus_ADAM_QA", "11_MPlusDrugs_QA", "12_MPlusHerbsSupplements_QA")
TABULAR_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
ARCHIVE_SUFFIXES = {".zip": "zip", ".tar": "tar", ".tar.gz": "tar", ".tgz": "tar"}
REQUIRED = ("question", "answer")
HF_PREFIX = "hf://"
# A folder holding this file was written by `medtune data validate`: never read back as input.
OUTPUT_MARKER = ".medtune-output"
# Rows are flat records; deeper nesting is a crafted input (and would exhaust recursion when echoed).
MAX_DEPTH = 32
READ_THERE = ", read there"  # a link inside the data folder: its target is read where it lies
# What a quarantined over-long line keeps of itself.
HEAD_BYTES = 1024
# Errors a stream raises when the bytes are not what the name says or end early.
_STREAM_ERRORS = (EOFError, OSError, zlib.error, tarfile.TarError, zipfile.BadZipFile, csv.Error)


class DataError(ValueError):
    """Input that cannot be used; the message names the file (and row and field where there is one)."""


@dataclass
class Ingested:
    rows: list[dict] = field(default_factory=list)
    quarantine: list[dict] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    # read on purpose but not as rows (MedQuAD's readme, links to files read where they lie), with why
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def read(self) -> int:
        return len(self.rows) + len(self.quarantine)


@dataclass
class Source:
    name: str  # as messages and rows show it: a path, or archive:member
    fmt: str  # jsonl, csv, tsv, parquet, medquad or hf
    open: Callable[[], contextlib.AbstractContextManager[BinaryIO]] | None = None
    location: Path | str | None = None  # the folder/archive (medquad) or dataset (hf)


def conversation_text(value, role: str):
    """Preference data in the conversational form: the text of the last `role` message of a message list
    (the prompt's user turn, the answer's assistant turn). Anything else is returned as it is, so the data
    contract's type rule names it."""
    if not isinstance(value, list) or not all(isinstance(m, dict) and "content" in m for m in value):
        return value
    turns = [m["content"] for m in value if m.get("role") == role]
    return turns[-1] if turns else value


def quarantine_record(row: dict, file: str, line: int | None, rule: str, detail: str) -> dict:
    return {"file": file, "line": line, "rule": rule, "detail": detail, "row": row}


def ingest(cfg: DataConfig) -> Ingested:
    out = Ingested()
    for source in _sources(cfg, out):
        out.files.append(source.name)
        if source.fmt == "medquad":
            _read_medquad(source.location, cfg, out)
        elif source.fmt == "hf":
            _read_records(source.name, _hf_records(source.location, cfg), cfg, out)
        else:
            with _named_errors(source.name):
                with source.open() as stream:
                    _read_records(source.name, _decode(source, stream, cfg, out), cfg, out,
                                  max_bad=cfg.max_bad_line_fraction)
        if cfg.limit and len(out.rows) >= cfg.limit:
            out.rows = out.rows[: cfg.limit]
            break
    if not out.files:
        raise DataError(f"{cfg.path}: no .jsonl, .csv, .tsv, .parquet (or .gz, .zip, .tar) or MedQuAD files found")
    return out


@contextlib.contextmanager
def _named_errors(name: str) -> Iterator[None]:
    try:
        yield
    except RecursionError:
        raise DataError(f"{name}: nested too deeply to read") from None
    except _STREAM_ERRORS as exc:
        raise DataError(f"{name}: cannot be read to the end ({type(exc).__name__}: {exc}); the file is "
                        "truncated or not the format its name says") from None


def _sources(cfg: DataConfig, out: Ingested) -> Iterator[Source]:
    if cfg.format == "hf" or cfg.path.startswith(HF_PREFIX):
        yield Source(cfg.path, "hf", location=cfg.path)
        return
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if cfg.format == "medquad" or (cfg.format == "auto" and _looks_like_medquad(path)):
        yield Source(str(path), "medquad", location=path)
    elif cfg.format == "auto" and _is_saved_dataset(path):
        yield Source(str(path), "hf", location=path)
    elif path.is_file():
        yield from _file_sources(path, cfg, _kind_of(path.name, cfg) or _unknown(path))
    else:
        for file, kind in _walk(path.resolve(), cfg, out):
            yield from _file_sources(file, cfg, kind)


def _unknown(path: Path):
    raise DataError(f"{path}: unknown format; expected one of {sorted(TABULAR_SUFFIXES)}, optionally .gz, "
                    f"or an archive {sorted(ARCHIVE_SUFFIXES)}")


def _kind_of(name: str, cfg: DataConfig) -> str | None:
    """zip, tar, or the tabular format (prefixed gz: when gzipped) of a file name; None if not readable."""
    lower = name.lower()
    for suffix, kind in ARCHIVE_SUFFIXES.items():
        if lower.endswith(suffix):
            return kind
    gz = lower.endswith(".gz")
    fmt = TABULAR_SUFFIXES.get(Path(lower.removesuffix(".gz")).suffix)
    if cfg.format in TABULAR_SUFFIXES.values():
        fmt = cfg.format
    return fmt and ("gz:" + fmt if gz else fmt)


def _walk(root: Path, cfg: DataConfig, out: Ingested) -> Iterator[tuple[Path, str]]:
    """The readable files under `root`, in sorted order; anything it cannot read stops the load, listed."""
    refused: dict[str, str] = {}
    found: list[tuple[Path, str]] = []

    def unreadable_folder(exc: OSError) -> None:
        refused[exc.filename] = f"folder cannot be read ({exc.strerror})"

    for folder, dirs, files in os.walk(root, onerror=unreadable_folder):
        here = Path(folder)
        if (here / OUTPUT_MARKER).exists() or (here.name == "medtune-validation"
                                                 and (here / "validation.json").exists()):  # older versions
            out.skipped[str(here)] = "output of medtune data validate"
            dirs.clear()
            continue
        hidden = sorted(n for n in files + dirs if n.startswith("."))  # .git, .cache: tools' bookkeeping
        out.skipped.update((str(here / n), "hidden") for n in hidden)
        dirs[:] = sorted(d for d in dirs if d not in hidden)
        for name in sorted(n for n in files if n not in hidden) + [d for d in dirs if (here / d).is_symlink()]:
            path = here / name
            why = _refusal(path, root, cfg)
            if why == "":
                found.append((path, _kind_of(name, cfg)))
            elif why.endswith(READ_THERE):
                out.skipped[str(path)] = why
            else:
                refused[str(path)] = why
    if refused:
        listed = "\n".join(f"  - {path}: {why}" for path, why in sorted(refused.items()))
        raise DataError(f"{root}: {len(refused)} file(s) here cannot be read as data; remove them or point "
                        f"data.path at the files to use:\n{listed}")
    yield from sorted(found)


def _refusal(path: Path, root: Path, cfg: DataConfig) -> str:
    """Why `path` is not read ("" when it is; "link to ..." when its target is read where it lies)."""
    mode = path.lstat().st_mode
    if stat.S_ISLNK(mode):
        target = path.resolve()
        if not target.exists():
            return f"broken link to {target}"
        if not target.is_relative_to(root):
            return f"link to {target}, outside the data folder {root}"
        return f"link to {target}{READ_THERE}"
    if not stat.S_ISREG(mode):
        return "not a regular file (device, pipe or socket)"
    if _kind_of(path.name, cfg) is None:
        return "not a format medtune reads"
    try:
        with path.open("rb"):
            return ""
    except OSError as exc:
        return f"cannot be opened ({exc.strerror})"


def _file_sources(path: Path, cfg: DataConfig, kind: str) -> Iterator[Source]:
    if kind == "zip":
        yield from _zip_sources(path, cfg)
    elif kind == "tar":
        yield from _tar_sources(path, cfg)
    else:
        yield _source(str(path), kind, lambda: path.open("rb"), cfg)


def _source(name: str, kind: str, opener: Callable, cfg: DataConfig) -> Source:
    """A tabular source whose stream is gunzipped when `kind` says so and capped at data.max_file_bytes."""
    gz, fmt = kind.startswith("gz:"), kind.removeprefix("gz:")

    @contextlib.contextmanager
    def capped() -> Iterator[BinaryIO]:
        with opener() as raw:
            inner = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw
            yield io.BufferedReader(_Capped(inner, name, cfg.max_file_bytes), buffer_size=1 << 16)

    return Source(name, fmt, capped)


class _Capped(io.RawIOBase):
    """A read-only stream that stops with a DataError past `cap` bytes (a decompression bomb, a huge member)."""

    def __init__(self, inner: BinaryIO, name: str, cap: int):
        self.inner, self.name, self.cap, self.total = inner, name, cap, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.inner.read(len(buffer))
        self.total += len(data)
        if self.total > self.cap:
            raise DataError(f"{self.name}: more than data.max_file_bytes={self.cap} bytes (decompressed); "
                            "raise the bound if this file is meant to be that large")
        buffer[: len(data)] = data
        return len(data)


def _refuse_members(archive: Path, refused: Counter, names: dict[str, list[str]], count: int,
                    cfg: DataConfig) -> None:
    if count > cfg.max_archive_members:
        raise DataError(f"{archive}: {count} members or more, over data.max_archive_members="
                        f"{cfg.max_archive_members}")
    if refused:
        listed = "; ".join(f"{n} {why} (e.g. {', '.join(names[why][:3])})" for why, n in sorted(refused.items()))
        raise DataError(f"{archive}: members medtune does not read, so nothing was read from it: {listed}")


def _tar_members(tar: tarfile.TarFile, archive: Path, cfg: DataConfig,
                 readable: Callable[[str], bool]) -> list[tarfile.TarInfo]:
    """The regular members `readable` accepts; links, devices, oversized or unknown members refuse the archive."""
    refused: Counter = Counter()
    names: dict[str, list[str]] = {}
    kept, count = [], 0
    for member in tar:
        count += 1
        if count > cfg.max_archive_members:
            break
        why = _member_refusal(member, cfg, readable)
        if why:
            refused[why] += 1
            names.setdefault(why, []).append(member.name)
        elif member.isfile():
            kept.append(member)
    _refuse_members(archive, refused, names, count, cfg)
    return kept


def _member_refusal(member: tarfile.TarInfo, cfg: DataConfig, readable: Callable[[str], bool]) -> str:
    if member.issym() or member.islnk():
        return "link member(s)"
    if member.isdev() or member.isfifo():
        return "device or pipe member(s)"
    if member.isdir():
        return ""
    if not member.isfile():
        return "member(s) of another type"
    if member.size > cfg.max_file_bytes:
        return f"member(s) over data.max_file_bytes={cfg.max_file_bytes}"
    return "" if readable(member.name) else "member(s) in a format medtune does not read"


def _open_tar(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{archive}: not a readable tar archive ({type(exc).__name__}: {exc})") from None


def _tar_sources(archive: Path, cfg: DataConfig) -> Iterator[Source]:
    with _open_tar(archive) as tar:
        with _named_errors(str(archive)):
            members = _tar_members(tar, archive, cfg, lambda name: _kind_of(name, cfg) not in (None, "zip", "tar"))
        for member in members:
            name = f"{archive}:{member.name}"
            yield _source(name, _kind_of(member.name, cfg), lambda m=member: tar.extractfile(m), cfg)


def _zip_sources(archive: Path, cfg: DataConfig) -> Iterator[Source]:
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{archive}: not a readable zip archive ({exc})") from None
    with zf:
        infos = zf.infolist()
        refused: Counter = Counter()
        names: dict[str, list[str]] = {}
        for info in infos:
            why = _zip_refusal(info, cfg)
            if why:
                refused[why] += 1
                names.setdefault(why, []).append(info.filename)
        _refuse_members(archive, refused, names, len(infos), cfg)
        for info in (i for i in infos if not i.is_dir()):
            yield _source(f"{archive}:{info.filename}", _kind_of(info.filename, cfg), lambda i=info: zf.open(i), cfg)


def _zip_refusal(info: zipfile.ZipInfo, cfg: DataConfig) -> str:
    if stat.S_ISLNK(info.external_attr >> 16):
        return "link member(s)"
    if info.is_dir():
        return ""
    if info.flag_bits & 0x1:
        return "encrypted member(s)"
    if info.file_size > cfg.max_file_bytes:
        return f"member(s) over data.max_file_bytes={cfg.max_file_bytes}"
    return "" if _kind_of(info.filename, cfg) not in (None, "zip", "tar") else \
        "member(s) in a format medtune does not read"


def _looks_like_medquad(path: Path) -> bool:
    if path.is_file():
        return path.name.lower().startswith("medquad") and path.name.endswith((".tar.gz", ".tgz"))
    return any(path.glob("MedQuAD*.tar.gz")) or any(path.rglob("*_QA/*.xml"))


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def _column_map(found: set[str], cfg: DataConfig, source: Path | str) -> dict[str, str]:
    """Source column -> canonical column for this file; fails naming the file and what it holds."""
    mapping = {column: cfg.columns.get(column, column) for column in found}
    targets: dict[str, list[str]] = {}
    for column, target in mapping.items():
        if target in CANONICAL_COLUMNS:
            targets.setdefault(target, []).append(column)
    clashes = {t: sorted(cols) for t, cols in targets.items() if len(cols) > 1}
    if clashes:
        clashes = {t: _shown(cols) for t, cols in clashes.items()}
        raise DataError(f"{source}: several columns map to the same field: {clashes}; "
                        "drop one from data.columns or from the file")
    missing = [c for c in REQUIRED if c not in targets]
    if missing:
        hint = f" (column mapping: {dict(cfg.columns)})" if cfg.columns else ""
        raise DataError(
            f"{source}: required column(s) {missing} not found; columns present: {_shown(sorted(found))}{hint}. "
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


def _decode(source: Source, stream: BinaryIO, cfg: DataConfig, out: Ingested) -> Iterator[tuple[int, dict]]:
    if source.fmt == "parquet":
        return _decode_parquet(source.name, stream)
    if source.fmt in ("csv", "tsv"):
        return _decode_csv(source.name, stream, "\t" if source.fmt == "tsv" else ",", cfg, out)
    return _decode_jsonl(source.name, stream, cfg, out)


def _decode_parquet(name: str, stream: BinaryIO) -> Iterator[tuple[int, dict]]:
    try:
        table = pq.read_table(io.BytesIO(stream.read()))  # Parquet needs to seek; the read is capped
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{name}: not a readable Parquet file ({exc})") from None
    yield from enumerate(table.to_pylist(), start=1)


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    # The csv module's bound is process-wide (131,072 by default): real answers can exceed it.
    before = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(before)


def _decode_csv(name: str, stream: BinaryIO, delimiter: str, cfg: DataConfig,
                out: Ingested) -> Iterator[tuple[int, dict]]:
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row is found and quarantined
    # with its line number instead of failing the whole file at the first bad byte; utf-8-sig drops a BOM.
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    with _csv_field_limit(cfg.max_row_bytes):
        reader = csv.reader(text, delimiter=delimiter)
        start = 1
        try:
            header = next(reader, None)
            if header is None:
                return
            repeated = sorted(column for column, n in Counter(header).items() if n > 1)
            if repeated:
                raise DataError(f"{name}: column(s) {_shown(repeated)} appear more than once in the header; "
                                "which one holds the data is ambiguous")
            start = reader.line_num + 1
            for fields in reader:
                line, start = start, reader.line_num + 1
                if not fields:
                    continue
                raw = dict(zip(header, fields))
                if len(fields) > len(header):
                    raw["_extra_fields"] = fields[len(header):]
                    out.quarantine.append(quarantine_record(_printable(raw), name, line, "csv_extra_fields",
                                                            f"{len(fields) - len(header)} more field(s) than the header"))
                    continue
                raw.update((column, None) for column in header[len(fields):])
                if any(_has_surrogate(v) for v in raw.values()):
                    out.quarantine.append(quarantine_record(_printable(raw), name, line, "not_utf8",
                                                            "the row holds bytes that are not valid UTF-8"))
                    continue
                yield line, raw
        except csv.Error as exc:
            raise DataError(f"{name} line {start}: {exc} (a field is bounded by "
                            f"data.max_row_bytes={cfg.max_row_bytes} characters)") from None


def _shown(values: list[str]) -> list[str]:
    """Names as a message may show them: a headerless file's "columns" are its first row of data."""
    return [phi.redact(_readable(v), 60) for v in values]


def _has_surrogate(value) -> bool:
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


def _printable(raw: dict) -> dict:
    """The row as it can be written to the quarantine: undecodable bytes shown as U+FFFD."""
    return {str(k): [_readable(x) for x in v] if isinstance(v, list) else _readable(v) for k, v in raw.items()}


def _readable(value):
    if not isinstance(value, str):
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = Counter(k for k, _ in pairs)
    repeated = [k for k, n in keys.items() if n > 1]
    if repeated:
        raise _DuplicateKey(repeated)
    return dict(pairs)


def _depth(value) -> int:
    """How deeply lists/objects nest in `value` (iterative: the value may be deeper than the stack)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _decode_jsonl(name: str, stream: BinaryIO, cfg: DataConfig, out: Ingested) -> Iterator[tuple[int, dict]]:
    def bad(number: int, raw, rule: str, detail: str) -> None:
        out.quarantine.append(quarantine_record({"raw": raw}, name, number, rule, detail))

    for number, blob, size in _lines(stream, cfg.max_row_bytes):
        if size > cfg.max_row_bytes:
            bad(number, blob.decode("utf-8", "replace"), "row_too_large",
                f"line of {size} bytes, over data.max_row_bytes={cfg.max_row_bytes} (first {len(blob)} kept)")
            continue
        if not blob.strip():
            continue
        try:
            raw = json.loads(blob.decode("utf-8"), object_pairs_hook=_unique_keys)
        except UnicodeDecodeError as exc:
            bad(number, blob.decode("utf-8", "replace"), "not_utf8", f"invalid UTF-8 at byte {exc.start}")
            continue
        except json.JSONDecodeError as exc:
            bad(number, blob.decode("utf-8"), "not_json", f"{exc.msg} at column {exc.colno}")
            continue
        except RecursionError:
            bad(number, blob[:HEAD_BYTES].decode("utf-8", "replace"), "too_deep",
                f"nested deeper than Python's parser allows (bound {MAX_DEPTH})")
            continue
        except _DuplicateKey as exc:
            bad(number, blob.decode("utf-8"), "duplicate_key",
                f"key(s) {_shown(exc.args[0])} appear more than once in one object")
            continue
        if not isinstance(raw, dict):
            bad(number, raw, "not_object", "a JSONL row must be an object")
            continue
        if _depth(raw) > MAX_DEPTH:
            bad(number, blob[:HEAD_BYTES].decode("utf-8", "replace"), "too_deep",
                f"values nest {_depth(raw)} levels deep (bound {MAX_DEPTH})")
            continue
        yield number, raw


def _lines(stream: BinaryIO, limit: int) -> Iterator[tuple[int, bytes, int]]:
    """(line number, bytes, size) per line, BOM dropped; a line over `limit` bytes is read past, not kept:
    only its first HEAD_BYTES come back, with its full size."""
    for number in range(1, 1 << 62):
        blob = stream.readline(limit + 1)
        if not blob:
            return
        if number == 1:
            blob = blob.removeprefix(codecs.BOM_UTF8)
        size = len(blob.rstrip(b"\r\n"))
        if size > limit:
            while not blob.endswith(b"\n"):
                rest = stream.readline(1 << 20)
                if not rest:
                    break
                size += len(rest.rstrip(b"\r\n"))
                blob = blob[:HEAD_BYTES] + rest[-1:]  # the last byte says whether the line has ended
        yield number, blob[:HEAD_BYTES] if size > limit else blob.rstrip(b"\r\n"), size


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


def _read_medquad(path: Path, cfg: DataConfig, out: Ingested) -> None:
    for member, xml_bytes in _medquad_documents(path, cfg, out):
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


def _medquad_documents(path: Path, cfg: DataConfig, out: Ingested) -> Iterator[tuple[str, bytes]]:
    archives = [path] if path.is_file() else sorted(path.glob("MedQuAD*.tar.gz"))
    for archive in archives:
        with _open_tar(archive) as tar, _named_errors(str(archive)):
            for member in _tar_members(tar, archive, cfg, lambda name: True):
                name = f"{archive.name}:{member.name}"
                if member.name.endswith(".xml"):
                    yield name, tar.extractfile(member).read()  # size checked against data.max_file_bytes
                else:
                    out.skipped[name] = "not a MedQuAD document (.xml)"
    if not archives:
        root = path.resolve()
        for file in sorted(path.rglob("*.xml")):
            if not file.resolve().is_relative_to(root):
                raise DataError(f"{file}: link to {file.resolve()}, outside the data folder {root}")
            if file.stat().st_size > cfg.max_file_bytes:
                raise DataError(f"{file}: larger than data.max_file_bytes={cfg.max_file_bytes}")
            yield str(file), file.read_bytes()
