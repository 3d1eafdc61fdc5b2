"""Evaluation suites beside the run's own split (`eval.suites` in the profile).

A suite is a file of questions with reference answers (free text) or labels and choices (closed form),
scored for base, candidate and champion with the same models as the test split. The default profile
ships two under data/suites (see their README): a slice of MMLU's medical subjects (closed form) and a
slice of K-QA (free text, real patient questions answered by physicians), so that a fine-tune that gets
better on its own split but worse elsewhere is caught.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from medtune.config import Config, SuiteConfig

ROOT = Path(__file__).resolve().parents[2]  # the checkout, where data/suites lives
# Columns read as choices when the suite's mapping does not name one.
CHOICE_COLUMNS = ("choices", "options")


class SuiteError(ValueError):
    """A suite file that cannot be scored; the message names the file, the row and the field."""


def resolve_path(path: str) -> Path:
    """A relative path is looked up in the working directory, then in the medtune checkout."""
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate
    shipped = ROOT / path
    if shipped.exists():
        return shipped
    raise SuiteError(f"{path}: suite file not found (looked in {Path.cwd()} and {ROOT})")


def read(path: str, columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Rows of a suite file with canonical column names (id, question, answer, choices)."""
    file = resolve_path(path)
    readers = {".jsonl": lambda f: pd.read_json(f, lines=True, dtype=False), ".json": lambda f: pd.read_json(
        f, lines=True, dtype=False), ".csv": lambda f: pd.read_csv(f, dtype=str), ".parquet": pd.read_parquet}
    if file.suffix not in readers:
        raise SuiteError(f"{file}: unsupported suite format {file.suffix!r} (jsonl, csv, parquet)")
    try:
        df = readers[file.suffix](file)
    except (ValueError, json.JSONDecodeError) as exc:
        raise SuiteError(f"{file}: cannot be read: {exc}") from None
    df = df.rename(columns=columns or {})
    if "choices" not in df:
        df = df.rename(columns={c: "choices" for c in CHOICE_COLUMNS[1:] if c in df})
    for field in ("question", "answer"):
        if field not in df:
            raise SuiteError(f"{file}: no '{field}' column (map one with columns: {{source: {field}}})")
        for row, value in enumerate(df[field], start=1):
            if not isinstance(value, str) or not value.strip():
                raise SuiteError(f"{file}: row {row}, field '{field}': empty or not text ({value!r})")
    if "id" not in df:
        df["id"] = [f"{file.stem}-{i}" for i in range(1, len(df) + 1)]
    df["id"] = df["id"].astype(str)
    return df


def scored_sets(cfg: Config) -> list:
    """Every suite of the profile, read, cut to its max_rows and with its choices resolved."""
    return [scored_set(cfg, suite) for suite in cfg.eval.suites]


def scored_set(cfg: Config, suite: SuiteConfig):
    from medtune import evaluate as ev

    items = ev.questions(read(suite.path, suite.columns), suite.max_rows)
    if suite.kind == "free_text":
        return ev.ScoredSet(suite.name, "free_text", items)
    shots = []
    if suite.few_shot_k:
        dev = ev.questions(read(suite.few_shot_path, suite.columns))
        examples = ev.closed_form_set(suite.name, dev, "likelihood", origin=suite.few_shot_path)
        shots = [(q, c.texts[c.gold]) for q, c in zip(dev["question"], examples.choices)][:suite.few_shot_k]
    return ev.closed_form_set(suite.name, items, cfg.eval.closed_form, shots=shots, origin=suite.path)
