"""Normalise, de-duplicate, budget, split and render validated rows.

Duplicate rule (documented here because it decides what the model sees):
  * Two questions are the same when they are equal after collapsing whitespace and ignoring case
    ("What is (are) Glaucoma ?" == "what is (are)  glaucoma ?").
  * Same question, same answer (after the same normalisation): the first row in source order is kept,
    later copies are dropped as `duplicate_question_same_answer`.
  * Same question, different answers (e.g. two websites answering it): reported as conflicting, and by
    default (`preprocess.conflicting_duplicates=drop`) only the first in source order is kept, the rest
    dropped as `duplicate_question_conflicting_answer`; with `keep` every distinct answer stays and
    all of them land in the same split.

Splits are grouped so that no question lands in two splits, and by topic (`focus`) when the source has
one, so the test split measures answers about conditions the model has not been trained on. Group
placement is decided by a seeded hash of the group key and rows are written in a canonical order, so
the same rows and seed always give the same splits, byte for byte. A Great Expectations check on the
finished splits proves that no question and no topic appears in two of them.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from medtune.config import PreprocessConfig
from medtune.rows import FILENAME as ROWS_FILE

SPLITS = ("train", "validation", "test")
_SPACE = re.compile(r"\s+")
ROW_FIELDS = ("id", "question", "answer", "context", "focus", "qtype", "source", "prompt", "completion")
DUPLICATE_RULES = ("duplicate_question_same_answer", "duplicate_question_conflicting_answer")
DROP_RULES = (*DUPLICATE_RULES, "over_token_budget")
MAX_CONFLICT_EXAMPLES = 20


class LeakageError(ValueError):
    """A question or topic ended up in two splits; a bug in grouping, never a data problem to skip."""


def normalise(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def question_key(text: str) -> str:
    """What makes two questions the same (the duplicate rule above)."""
    return normalise(text).casefold()


@dataclass
class Prepared:
    splits: dict[str, pd.DataFrame]
    dropped: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def _user_content(question: str, context: str | None) -> str:
    return f"Context:\n{context}\n\nQuestion: {question}" if context else question


def render_prompt(tokenizer, system_prompt: str, question: str, context: str | None = None) -> str:
    messages = [{"role": "system", "content": system_prompt},
                {"role": "user", "content": _user_content(question, context)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def render_prompts(tokenizer, system_prompt: str, questions, contexts) -> list[str]:
    """`render_prompt` for many rows. Templates that only paste the user's text in are rendered once and
    filled by substitution (Jinja per row is most of preprocessing time on MedQuAD); others row by row."""
    probes = ["\x00medtune-user-a\x00", "\x00medtune-user-b\x00"]
    rendered = [render_prompt(tokenizer, system_prompt, probe) for probe in probes]
    before, sep, after = rendered[0].partition(probes[0])
    if sep and probes[0] not in after and rendered[1] == before + probes[1] + after:
        return [before + _user_content(q, c) + after for q, c in zip(questions, contexts)]
    return [render_prompt(tokenizer, system_prompt, q, c) for q, c in zip(questions, contexts)]


def _text_or_none(value) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return str(value)


def _canonical_frame(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    for column in ("context", "focus", "qtype", "source", "id", "_file", "_line"):
        if column not in df:
            df[column] = None
        if column != "_line":
            # object dtype keeps None as None; a str column would turn it into NaN, which is not JSON
            df[column] = pd.Series([_text_or_none(v) for v in df[column]], index=df.index, dtype=object)
    df["question"] = df["question"].map(normalise)
    df["answer"] = df["answer"].map(normalise)
    df["qkey"] = df["question"].map(str.casefold)
    df["akey"] = df["answer"].map(str.casefold)
    df["id"] = [i if i is not None else f"row-{n}" for n, i in enumerate(df["id"])]
    return df.reset_index(drop=True)


def _deduplicate(df: pd.DataFrame, cfg: PreprocessConfig) -> tuple[pd.DataFrame, list[dict], list[dict]]:
    conflicts = _conflicts(df)
    same = df.duplicated(subset=["qkey", "akey"], keep="first")
    firsts = df[~df.duplicated("qkey", keep="first")]
    first = dict(zip(firsts["qkey"], firsts[["id", "_file", "source"]].to_dict(orient="records")))
    dropped = _drop_records(df[same], "duplicate_question_same_answer", first,
                            "same question and answer as {id} ({where})")
    df = df[~same]
    if cfg.conflicting_duplicates == "drop":
        other = df.duplicated("qkey", keep="first")
        dropped += _drop_records(df[other], "duplicate_question_conflicting_answer", first,
                                 "same question as {id} ({where}) with a different answer; kept that one")
        df = df[~other]
    return df, dropped, conflicts


def _conflicts(df: pd.DataFrame) -> list[dict]:
    distinct = df.drop_duplicates(subset=["qkey", "akey"])
    many = distinct[distinct.duplicated("qkey", keep=False)]
    grouped: dict[str, dict] = {}
    for r in many[["qkey", "question", "answer", "id", "source", "_file"]].to_dict(orient="records"):
        entry = grouped.setdefault(r["qkey"], {"question": r["question"], "answers": []})
        entry["answers"].append({"id": r["id"], "source": r["source"], "file": r["_file"], "answer": r["answer"][:200]})
    return list(grouped.values())


def _drop_records(rows: pd.DataFrame, rule: str, first: dict[str, dict], template: str) -> list[dict]:
    out = []
    for r in rows.to_dict(orient="records"):
        kept = first[r["qkey"]]
        detail = template.format(id=kept["id"], where=kept["_file"] or kept["source"] or "same source")
        out.append(_quarantine(r, rule, detail))
    return out


def _quarantine(r: dict, rule: str, detail: str) -> dict:
    line = r.get("_line")
    row = {k: r.get(k) for k in ("id", "question", "answer", "context", "focus", "qtype", "source")
           if r.get(k) is not None}
    return {"file": r.get("_file"), "line": None if pd.isna(line) else int(line), "rule": rule,
            "detail": detail, "row": row}


def _render(df: pd.DataFrame, tokenizer, cfg: PreprocessConfig) -> pd.DataFrame:
    df = df.copy()
    df["prompt"] = render_prompts(tokenizer, cfg.system_prompt, df["question"], df["context"])
    df["completion"] = df["answer"] + tokenizer.eos_token
    texts = [p + c for p, c in zip(df["prompt"], df["completion"])]
    # one batched call: the fast tokenizers parallelise it, a per-row loop is ~10x slower on MedQuAD
    df["n_tokens"] = [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
    return df


def _group_keys(df: pd.DataFrame) -> pd.Series:
    """Union of topic groups and question groups: rows sharing either end up in one group."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    keys = []
    for q, focus in zip(df["qkey"], df["focus"]):
        node = f"q:{q}"
        topic = focus.strip().casefold() if isinstance(focus, str) else ""
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
    rows_in = len(df)
    df = _canonical_frame(df)
    df, dropped, conflicts = _deduplicate(df, cfg)
    df = _render(df, tokenizer, cfg)
    over = df["n_tokens"] > cfg.max_tokens
    dropped += [_quarantine(r, "over_token_budget", f"{r['n_tokens']} tokens, more than preprocess.max_tokens="
                            f"{cfg.max_tokens}") for r in df[over].to_dict(orient="records")]
    df = df[~over].copy()

    df["split"] = assign_splits(_group_keys(df), cfg)
    check_no_leakage(df)
    splits = {name: _canonical_order(df[df["split"] == name]) for name in SPLITS}
    summary = {
        "rows_in": rows_in,
        "rows_out": int(len(df)),
        "rows_dropped": len(dropped),
        "dropped_by_rule": {r: sum(d["rule"] == r for d in dropped) for r in DROP_RULES},
        "conflicting_duplicate_questions": len(conflicts),
        "conflicting_duplicates": cfg.conflicting_duplicates,
        "conflict_examples": conflicts[:MAX_CONFLICT_EXAMPLES],
        "topics": {name: int(s["focus"].dropna().str.casefold().nunique()) for name, s in splits.items()},
        "splits": {name: {"rows": int(len(s)), "fingerprint": fingerprint(s)} for name, s in splits.items()},
    }
    if summary["rows_in"] != summary["rows_out"] + summary["rows_dropped"]:
        raise AssertionError(f"row accounting broken in preprocessing: {summary}")
    return Prepared(splits=splits, dropped=dropped, conflicts=conflicts, summary=summary)


def _canonical_order(df: pd.DataFrame) -> pd.DataFrame:
    # Sorting by content (not input position) makes the file independent of the order rows arrived in.
    ordered = df.sort_values(["qkey", "akey", "id"], kind="stable")
    return ordered[list(ROW_FIELDS) + ["n_tokens"]].reset_index(drop=True)


def check_no_leakage(df: pd.DataFrame) -> dict:
    """GX check on the assigned splits: every question and every topic belongs to exactly one split."""
    import great_expectations.expectations as gxe
    from great_expectations import ExpectationSuite

    from medtune.validate import run_suite

    topics = df["focus"].fillna("").str.strip().str.casefold()
    has_topic = topics != ""
    keys = pd.concat([pd.DataFrame({"key": "question: " + df["qkey"], "split": df["split"]}),
                      pd.DataFrame({"key": "topic: " + topics[has_topic], "split": df["split"][has_topic]})])
    pairs = keys.drop_duplicates().reset_index(drop=True)
    pairs["_row"] = range(len(pairs))
    suite = ExpectationSuite(name="medtune_splits", expectations=[gxe.ExpectColumnValuesToBeUnique(column="key")])
    result = run_suite(pairs, suite)
    if not result.success:
        leaked = pairs.iloc[[int(h["_row"]) for h in result.results[0].result["unexpected_index_list"]]]
        examples = leaked.groupby("key")["split"].apply(sorted).head(5).to_dict()
        raise LeakageError(f"{leaked['key'].nunique()} questions/topics are in more than one split, e.g. {examples}")
    return result.to_json_dict()


def canonical_lines(df: pd.DataFrame, fields: tuple[str, ...] = ROW_FIELDS) -> list[str]:
    return [json.dumps({k: r.get(k) for k in fields}, ensure_ascii=False, sort_keys=True, default=str)
            for r in df.to_dict(orient="records")]


def fingerprint(df: pd.DataFrame, fields: tuple[str, ...] = ROW_FIELDS) -> str:
    return hashlib.sha256("".join(line + "\n" for line in canonical_lines(df, fields)).encode()).hexdigest()


def write_split(df: pd.DataFrame, directory: Path, fields: tuple[str, ...] = ROW_FIELDS) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / ROWS_FILE).write_text("".join(line + "\n" for line in canonical_lines(df, fields)))

