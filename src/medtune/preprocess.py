"""Normalise, de-duplicate, budget, split and render validated rows.

Splits are grouped so that no question lands in two splits, and by topic (`focus`) when the source has
one, so the test split measures answers about conditions the model has not been trained on. Group
placement is decided by a seeded hash of the group key, so the same input and seed always give the
same splits, byte for byte, independent of input order within a group.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medtune.config import PreprocessConfig

SPLITS = ("train", "validation", "test")
_SPACE = re.compile(r"\s+")
ROW_FIELDS = ("id", "question", "answer", "focus", "qtype", "source", "prompt", "completion")


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def question_key(text: str) -> str:
    return normalise(text).casefold()


@dataclass
class Prepared:
    splits: dict[str, pd.DataFrame]
    dropped: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def render_prompt(tokenizer, system_prompt: str, question: str) -> str:
    messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _group_keys(df: pd.DataFrame) -> pd.Series:
    """Union of topic groups and question groups: rows sharing either end up in one group."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    has_focus = "focus" in df and df["focus"].fillna("").astype(str).str.strip().ne("").any()
    keys = []
    for q, focus in zip(df["qkey"], df["focus"] if has_focus else [""] * len(df)):
        node = f"q:{q}"
        topic = str(focus or "").strip().casefold()
        if topic:
            parent[find(node)] = find(f"f:{topic}")
        keys.append(node)
    return pd.Series([find(k) for k in keys], index=df.index)


def assign_splits(groups: pd.Series, cfg: PreprocessConfig) -> pd.Series:
    sizes = groups.value_counts()
    order = sorted(sizes.index, key=lambda g: hashlib.sha256(f"{cfg.seed}:{g}".encode()).hexdigest())
    total = len(groups)
    bounds = {"test": cfg.test_fraction * total, "validation": (cfg.test_fraction + cfg.val_fraction) * total}
    placed, seen = {}, 0
    for group in order:
        placed[group] = "test" if seen < bounds["test"] else "validation" if seen < bounds["validation"] else "train"
        seen += sizes[group]
    return groups.map(placed)


def prepare(df: pd.DataFrame, tokenizer, cfg: PreprocessConfig) -> Prepared:
    df = df.copy()
    for column in ("focus", "qtype", "source", "id"):
        if column not in df:
            df[column] = None
    df["question"] = df["question"].map(normalise)
    df["answer"] = df["answer"].map(normalise)
    df["qkey"] = df["question"].map(question_key)
    df["id"] = [str(i) if i is not None and str(i) != "nan" else f"row-{n}" for n, i in enumerate(df["id"])]
    dropped: list[dict] = []

    # Rule: an exact copy (same normalised question and answer) keeps its first occurrence only.
    exact = df.duplicated(subset=["qkey", "answer"], keep="first")
    dropped += _drop_records(df[exact], "exact_duplicate", "same question and answer as an earlier row")
    df = df[~exact]
    conflicting = int(df.groupby("qkey")["answer"].nunique().gt(1).sum())

    df["prompt"] = [render_prompt(tokenizer, cfg.system_prompt, q) for q in df["question"]]
    df["completion"] = df["answer"] + tokenizer.eos_token
    lengths = [len(tokenizer(p + c, add_special_tokens=False)["input_ids"])
               for p, c in zip(df["prompt"], df["completion"])]
    df["n_tokens"] = lengths
    over = df["n_tokens"] > cfg.max_tokens
    dropped += _drop_records(df[over], "over_token_budget", f"more than preprocess.max_tokens={cfg.max_tokens}")
    df = df[~over]

    df["split"] = assign_splits(_group_keys(df), cfg)
    splits = {name: df[df["split"] == name][list(ROW_FIELDS) + ["n_tokens"]].reset_index(drop=True)
              for name in SPLITS}
    summary = {
        "rows_in": int(len(df) + len(dropped)),
        "rows_out": int(len(df)),
        "dropped_by_rule": {r: sum(d["rule"] == r for d in dropped) for r in ("exact_duplicate", "over_token_budget")},
        "conflicting_duplicate_questions": conflicting,
        "splits": {name: {"rows": int(len(s)), "fingerprint": fingerprint(s)} for name, s in splits.items()},
    }
    return Prepared(splits=splits, dropped=dropped, summary=summary)


def _drop_records(rows: pd.DataFrame, rule: str, detail: str) -> list[dict]:
    keep = [c for c in ("id", "question", "answer", "focus", "_file", "_line") if c in rows]
    return [{"rule": rule, "detail": detail, "row": r} for r in rows[keep].to_dict(orient="records")]


def canonical_lines(df: pd.DataFrame) -> list[str]:
    return [json.dumps({k: r[k] for k in ROW_FIELDS}, ensure_ascii=False, sort_keys=True, default=str)
            for r in df.to_dict(orient="records")]


def fingerprint(df: pd.DataFrame) -> str:
    return hashlib.sha256("\n".join(canonical_lines(df)).encode()).hexdigest()


def write_split(df: pd.DataFrame, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "rows.jsonl").write_text("".join(line + "\n" for line in canonical_lines(df)))


def read_split(directory: Path) -> pd.DataFrame:
    return pd.read_json(directory / "rows.jsonl", orient="records", lines=True, dtype=False)
