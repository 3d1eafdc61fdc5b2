"""Validate ingested rows with a Great Expectations suite and split them into kept and quarantined.

The suite is code (`build_suite`) and is saved with every run. Row-level expectations (types, non-blank,
length bounds in characters and tokens, allowed categorical values, personal data) name the rows that
fail them through GX's unexpected index list; those rows go to quarantine with the rule as the reason.
Duplicate questions are reported here and resolved in preprocessing, where the rule is documented.

Every value GX or a rule echoes (report, Data Docs, quarantine, messages) goes through `phi.redact`, and
Data Docs HTML-escape it: a cell is data, never markup. The unmasked quarantine is written only to a
restricted file (mode 0600) next to the masked one, for the data owner.

Preference data (`pairs=True`) goes through the same contract with prompt -> question, chosen -> answer and a
`rejected` answer held to the answer's rules, plus one more: the two sides must differ (`pair.sides_differ`).
"""

from __future__ import annotations

import copy
import html
import json
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd

from medtune import phi
from medtune.config import CANONICAL_COLUMNS, DataConfig
from medtune.rows import FILENAME as ROWS_FILE
from medtune.ingest import REQUIRED, DataError, Ingested, conversation_text, ingest, quarantine_record

log = logging.getLogger(__name__)
ROW_ID = "_row"
# Personal data and control characters are looked for in every field a row keeps, not only the free text:
# a `source` or `id` cell reaches the training data just the same. Other columns are dropped (and listed).
SCANNED_COLUMNS = CANONICAL_COLUMNS
# Rows the publisher shipped without answers are counted, but do not count against the kept fraction.
NOT_ELIGIBLE_RULES = {"answer_removed_by_publisher"}
SUITE_NAME = "medtune_qa"
REJECTED = "rejected"
SIDES_DIFFER = "_sides_differ"  # helper column: chosen and rejected are different texts


def _rule(expectation, rule: str):
    expectation.meta = {"rule": rule}
    return expectation


def _text_fields(pairs: bool) -> tuple[str, ...]:
    return (*REQUIRED, REJECTED) if pairs else REQUIRED


def _bound(column: str) -> str:
    """The config field prefix bounding `column`: the rejected answer is held to the answer's bounds."""
    return "answer" if column == REJECTED else column


def build_suite(cfg: DataConfig, columns: set[str] = frozenset(REQUIRED), pairs: bool = False) -> gx.ExpectationSuite:
    """The data contract. Order matters: a row failing several rules is quarantined under the first."""
    exp = []
    for column in _text_fields(pairs):
        low, high = getattr(cfg, f"min_{_bound(column)}_chars"), getattr(cfg, f"max_{_bound(column)}_chars")
        exp += [
            _rule(gxe.ExpectColumnToExist(column=column), f"{column}.present"),
            _rule(gxe.ExpectColumnValuesToNotBeNull(column=column), f"{column}.not_null"),
            _rule(gxe.ExpectColumnValuesToBeOfType(column=column, type_="str"), f"{column}.is_text"),
            _rule(gxe.ExpectColumnValuesToMatchRegex(column=column, regex=r"\S"), f"{column}.not_blank"),
            _rule(gxe.ExpectColumnValueLengthsToBeBetween(column=column, min_value=low, max_value=high),
                  f"{column}.length_chars"),
        ]
        if getattr(cfg, f"max_{_bound(column)}_tokens"):
            exp.append(_rule(gxe.ExpectColumnValuesToBeBetween(
                column=_tokens(column), min_value=1, max_value=getattr(cfg, f"max_{_bound(column)}_tokens")),
                f"{column}.length_tokens"))
    if pairs:
        exp.append(_rule(gxe.ExpectColumnValuesToBeInSet(column=SIDES_DIFFER, value_set=[True]), "pair.sides_differ"))
    if "context" in columns:
        exp.append(_rule(gxe.ExpectColumnValuesToBeOfType(column="context", type_="str"), "context.is_text"))
    for column in (c for c in SCANNED_COLUMNS if c in columns):
        # NUL, ESC, BEL...: no tokenizer or terminal should get them; tab and newlines are text.
        exp.append(_rule(gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=phi.CONTROL),
                         f"{column}.control_chars"))
    for column, values in sorted(cfg.allowed_values.items()):
        exp.append(_rule(gxe.ExpectColumnValuesToBeInSet(column=column, value_set=list(values)),
                         f"{column}.allowed_values"))
    for kind in phi.KINDS:
        action = getattr(cfg.phi, kind)
        if action == "off":
            continue
        # mask: a warning, so the row stays; the rows it flags are masked after the run.
        severity = "critical" if action == "block" else "warning"
        for column in (c for c in SCANNED_COLUMNS if c in columns):
            exp.append(_rule(gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=phi.PATTERNS[kind],
                                                                   severity=severity), f"{column}.phi_{kind}"))
    # Reported only: preprocessing resolves duplicates under a documented rule.
    exp.append(_rule(gxe.ExpectColumnValuesToBeUnique(column="question", severity="warning"), "question.unique"))
    return gx.ExpectationSuite(name=SUITE_NAME, expectations=exp)


def _tokens(column: str) -> str:
    return f"_{column}_tokens"


@dataclass
class Validation:
    kept: pd.DataFrame
    quarantine: list[dict]
    summary: dict
    gx_result: dict
    suite: dict
    docs_html: str = ""
    phi_masked: dict = field(default_factory=dict)


def run_suite(df: pd.DataFrame, suite: gx.ExpectationSuite):
    from great_expectations.data_context.types.base import (DataContextConfig, InMemoryStoreBackendDefaults,
                                                            ProgressBarsConfig)

    # No temporary Data Docs site (GX would leave a folder in /tmp per run): docs are rendered by render_docs.
    config = DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
                               progress_bars=ProgressBarsConfig(globally=False))
    context = gx.get_context(mode="ephemeral", project_config=config)
    batch = (context.data_sources.add_pandas("medtune").add_dataframe_asset("qa")
             .add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="qa", data=batch, suite=suite))
    return definition.run(batch_parameters={"dataframe": df},
                          result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW_ID]})


def _frame(rows: list[dict]) -> pd.DataFrame:
    # object dtype keeps a number in a text column a number, so the type rule can name it.
    df = pd.DataFrame(rows, dtype=object)
    df[ROW_ID] = range(len(df))
    return df


def _mask_flagged(df: pd.DataFrame, result) -> dict[str, int]:
    """Mask personal data in the rows the suite's mask-mode (warning) PHI rules flagged."""
    counts: Counter = Counter()
    for res in result.results:
        exp = res.expectation_config
        if res.success or exp.severity != "warning" or ".phi_" not in exp.meta["rule"]:
            continue
        column, kind = exp.kwargs["column"], exp.meta["rule"].split(".phi_")[1]
        rows = [int(hit[ROW_ID]) for hit in res.result.get("unexpected_index_list", [])]
        df.loc[rows, column] = [phi.mask(v, (kind,), counts) for v in df.loc[rows, column]]
    return dict(counts)


def _add_token_counts(df: pd.DataFrame, cfg: DataConfig, tokenizer, pairs: bool = False) -> None:
    for column in _text_fields(pairs):
        if not getattr(cfg, f"max_{_bound(column)}_tokens"):
            continue
        if tokenizer is None:
            raise DataError(f"data.max_{_bound(column)}_tokens is set but no tokenizer was given to count tokens")
        texts = [v if isinstance(v, str) else "" for v in df[column]]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        df[_tokens(column)] = [len(i) if isinstance(v, str) else None for i, v in zip(ids, df[column])]


def _choice_failures(df: pd.DataFrame, failed: dict) -> list[int]:
    """Closed form: rows whose answer names none of their choices (a choices column, lettered options in the
    question, or the set's distinct answers); see medtune.choices."""
    from medtune import choices

    ok = df[~df[ROW_ID].isin(failed)]
    has_column = "choices" in ok and ok["choices"].notna().any()
    set_labels = None
    if not has_column and not all(choices.lettered_options(str(q)) for q in ok["question"]):
        try:
            set_labels = choices.dataset_labels(ok["answer"].astype(str))
        except choices.ChoiceError:
            set_labels = ()  # no label set: only rows with their own options can be closed-form rows
    bad = []
    for row in ok.to_dict(orient="records"):
        try:
            choices.resolve(str(row["question"]), str(row["answer"]), row.get("choices") if has_column else None,
                            set_labels or None)
        except choices.ChoiceError:
            bad.append(row[ROW_ID])
    return bad


def _failed_rows(result) -> dict[int, tuple[str, str]]:
    """Row id -> (rule, column) of the first blocking expectation each row fails."""
    failed: dict[int, tuple[str, str]] = {}
    for res in result.results:
        exp = res.expectation_config
        if res.success or exp.severity == "warning" or "unexpected_index_list" not in res.result:
            continue
        for hit in res.result["unexpected_index_list"]:
            rule = exp.meta["rule"]
            failed.setdefault(int(hit[ROW_ID]), (rule, rule.split(".", 1)[0]))  # token rules run on a helper
    return failed


def _redact_results(result) -> None:
    """Values GX echoes back (any rule: a row failing a length bound may hold an SSN too) are redacted."""
    for res in result.results:
        res.result = phi.redact_tree(res.result)


def validate(cfg: DataConfig, tokenizer=None, pairs: bool = False) -> Validation:
    """Ingest and validate `cfg`'s data; `pairs`: preference rows (question = prompt, answer = chosen, rejected)."""
    ingested: Ingested = ingest(cfg)
    quarantine = list(ingested.quarantine)
    if not ingested.rows:
        raise DataError(_stop_message(cfg, ingested.read, 0, quarantine, "no rows left after decoding"))
    if pairs:
        _flatten_pairs(cfg, ingested.rows)
    df = _frame(ingested.rows)
    dropped = [c for c in df.columns if c not in CANONICAL_COLUMNS and not c.startswith("_")]
    df = df.drop(columns=dropped)
    _add_token_counts(df, cfg, tokenizer, pairs)
    if pairs:
        df[SIDES_DIFFER] = [_differ(a, b) for a, b in zip(df["answer"], df[REJECTED])]
    suite = build_suite(cfg, set(df.columns), pairs)
    suite_json = suite.to_json_dict()  # before GX attaches ids, so the saved suite is the code's
    result = run_suite(df, suite)
    _redact_results(result)
    masked = _mask_flagged(df, result)

    failed = _failed_rows(result)
    if cfg.kind == "closed_form":
        for row_id in _choice_failures(df, failed):
            failed[row_id] = ("answer.names_a_choice", "answer")
    records = df.to_dict(orient="records")
    for row_id, (rule, column) in sorted(failed.items()):
        row = records[row_id]
        quarantine.append(quarantine_record(_public(row), row["_file"], row["_line"], rule,
                                            _describe(rule, column, row, cfg)))
    helpers = [c for c in df.columns if c in (ROW_ID, SIDES_DIFFER) or c.endswith("_tokens") and c.startswith("_")]
    kept = df[~df[ROW_ID].isin(failed)].drop(columns=helpers).reset_index(drop=True)
    summary = _summary(cfg, ingested, kept, quarantine, df, result, masked)
    summary["columns_dropped"] = [phi.redact(str(c), 60) for c in dropped]  # not in the data contract
    log.info("validation of %s: read %d, kept %d, quarantined %d %s", cfg.path, summary["rows_read"],
             summary["rows_kept"], summary["rows_quarantined"], summary["quarantined_by_rule"])
    validation = Validation(kept=kept, quarantine=quarantine, summary=summary, gx_result=result.to_json_dict(),
                            suite=suite_json, docs_html=render_docs(result), phi_masked=masked)
    if kept.empty or summary["kept_fraction"] < cfg.min_kept_fraction:
        why = ("no rows passed validation" if kept.empty else
               f"kept fraction {summary['kept_fraction']:.2f} is under the floor "
               f"data.min_kept_fraction={cfg.min_kept_fraction}")
        raise ValidationStopped(_stop_message(cfg, ingested.read, len(kept), quarantine, why), validation)
    return validation


def _flatten_pairs(cfg: DataConfig, rows: list[dict]) -> None:
    """Conversational preference rows (message lists) as text: the prompt's user turn, the answers' replies."""
    if not any(REJECTED in row for row in rows):
        columns = sorted({k for row in rows for k in row if not k.startswith("_")})
        raise DataError(f"{cfg.path}: preference data needs a rejected answer column; columns present: "
                        f"{[phi.redact(c, 60) for c in columns]}. Map it with data.columns, e.g. "
                        "--set preference.data.columns.worse=rejected")
    for row in rows:
        row["question"] = conversation_text(row.get("question"), "user")
        for column in ("answer", REJECTED):
            row[column] = conversation_text(row.get(column), "assistant")


def _differ(chosen, rejected) -> bool:
    """False when both sides are the same text (whitespace and case folded); other faults have their own rules."""
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        return True
    return " ".join(chosen.split()).casefold() != " ".join(rejected.split()).casefold()


class ValidationStopped(DataError):
    """A blocking failure after the suite ran: carries the result so the quarantine and docs can be kept."""

    def __init__(self, message: str, validation: Validation):
        super().__init__(message)
        self.validation = validation


def _summary(cfg, ingested: Ingested, kept, quarantine, df, result, masked) -> dict:
    eligible = ingested.read - sum(q["rule"] in NOT_ELIGIBLE_RULES for q in quarantine)
    summary = {
        "files": ingested.files,
        "files_skipped": ingested.skipped,
        "rows_read": ingested.read,
        "rows_kept": len(kept),
        "rows_quarantined": len(quarantine),
        "quarantined_by_rule": dict(Counter(q["rule"] for q in quarantine).most_common()),
        "kept_fraction": len(kept) / eligible if eligible else 0.0,
        "duplicate_questions": int(df["question"].astype(str).duplicated().sum()),
        "phi_masked": masked,
        "suite_success": bool(result.success),
    }
    # The invariant an auditor checks first: nothing is silently lost.
    if summary["rows_read"] != summary["rows_kept"] + summary["rows_quarantined"]:
        raise AssertionError(f"row accounting broken: {summary}")
    return summary


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_") and not _is_missing(v)}


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _describe(rule: str, column: str, row: dict, cfg: DataConfig) -> str:
    if rule == "pair.sides_differ":
        return "fields 'answer' (chosen) and 'rejected' are the same text"
    value = row.get(column)
    check = rule.split(".", 1)[1]
    if check == "length_tokens":
        return f"field '{column}' has {row[_tokens(column)]} tokens (bound data.max_{_bound(column)}_tokens)"
    if _is_missing(value):
        return f"field '{column}' is missing"
    if check == "is_text":
        return f"field '{column}' is {type(value).__name__}, expected text"
    if check == "not_blank":
        return f"field '{column}' is empty"
    if check == "length_chars":
        return f"field '{column}' has {len(value)} characters (bounds data.min/max_{_bound(column)}_chars)"
    if check == "names_a_choice":
        return f"field 'answer' is {str(value)[:40]!r}, which names none of the row's choices (data.kind=closed_form)"
    if check == "allowed_values":
        return f"field '{column}' is {phi.redact(str(value), 60)!r}, not one of data.allowed_values.{column}"
    if check == "control_chars":
        at = re.search(phi.CONTROL, value).start()
        return f"field '{column}' holds control character {phi.redact(value[at])} at character {at + 1}"
    if check.startswith("phi_"):
        kind = check.removeprefix("phi_")
        return f"field '{column}' contains {kind} (data.phi.{kind}=block): {_excerpt(value, kind)}"
    return f"field '{column}' failed {rule}"


def _excerpt(text: str, kind: str, width: int = 40) -> str:
    match = re.search(phi.PATTERNS[kind], text)
    # start at a word boundary so the excerpt never opens with the tail of another identifier
    start = text.rfind(" ", 0, match.start() - width) + 1 if match and match.start() > width else 0
    return "..." + phi.redact(text[start:], 2 * width + 20) + "..."


def _stop_message(cfg: DataConfig, read: int, kept: int, quarantine: list[dict], why: str) -> str:
    lines = [f"{cfg.path}: validation stopped the run: {why}.",
             f"  rows read {read}, kept {kept}, quarantined {len(quarantine)}; by rule:"]
    for rule, count in Counter(q["rule"] for q in quarantine).most_common():
        example = next(q for q in quarantine if q["rule"] == rule)
        where = example["file"] + (f" line {example['line']}" if example["line"] else "")
        lines.append(f"  - {rule}: {count} rows, e.g. {where}: {example['detail']}")
        question = example["row"].get("question")
        if isinstance(question, str) and ".phi_" not in rule:
            lines.append(f"      question: {phi.redact(question, 100)!r}")
    return "\n".join(lines)


def render_docs(result) -> str:
    """GX Data Docs page for this validation, as one self-contained HTML file (styles inlined)."""
    from great_expectations.render.renderer import ValidationResultsPageRenderer
    from great_expectations.render.view import DefaultJinjaPageView

    # GX writes values into the page as they are: escape them so a cell cannot carry markup or script.
    escaped = copy.deepcopy(result)
    for res in escaped.results:
        res.result = _escape_tree(res.result)
    page = DefaultJinjaPageView().render(ValidationResultsPageRenderer().render(escaped))
    css = (resources.files("great_expectations.render.view") / "static/styles/data_docs_default_styles.css")
    style = f"<style>{css.read_text()}</style>"
    return re.sub(r'<link[^>]*data_docs_default_styles\.css[^>]*>', lambda _: style, page, count=1)


def _escape_tree(node):
    if isinstance(node, str):
        return html.escape(node)
    if isinstance(node, dict):
        return {_escape_tree(k): _escape_tree(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_escape_tree(v) for v in node]
    return node


def write_outputs(result: Validation, data_dir: Path, quarantine_path: Path, report_path: Path,
                  docs_path: Path | None = None) -> None:
    if data_dir is not None:
        data_dir.mkdir(parents=True, exist_ok=True)
        result.kept.to_json(data_dir / ROWS_FILE, orient="records", lines=True, force_ascii=False)
    write_quarantine(result.quarantine, quarantine_path)
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps({"summary": result.summary, "suite": result.suite,
                                       "great_expectations": result.gx_result}, indent=2, default=str))
    if docs_path is not None:
        docs_path.parent.mkdir(parents=True, exist_ok=True)
        docs_path.write_text(result.docs_html)


def raw_quarantine_path(path: Path) -> Path:
    """Where the unmasked quarantine lies: next to the masked one, readable by its owner only."""
    return path.with_name(f"{path.stem}.raw{path.suffix}")


def write_quarantine(records: list[dict], path: Path) -> None:
    """The masked quarantine at `path` (safe to log) and the raw one at `raw_quarantine_path` (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_jsonl(path, (redact_record(r) for r in records), 0o644)
    _write_jsonl(raw_quarantine_path(path), records, 0o600)


def redact_record(record: dict) -> dict:
    return {**record, "detail": phi.redact(record["detail"], 500), "row": phi.redact_tree(record["row"])}


def _write_jsonl(path: Path, records, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")

