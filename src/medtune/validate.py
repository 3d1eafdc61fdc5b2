"""Validate ingested rows with a Great Expectations suite and split them into kept and quarantined.

Row-level expectations (non-null, length bounds) name the rows that fail them through GX's unexpected
index list; those rows go to quarantine with the expectation as the reason. Column-level results
(duplicates) are reported, not quarantined: preprocessing decides what a duplicate means.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd

from medtune.config import DataConfig
from medtune.ingest import DataError, Ingested, ingest, quarantine_record

log = logging.getLogger(__name__)
ROW_ID = "_row"
# Rows the publisher shipped without answers are counted, but do not count against the kept fraction.
NOT_ELIGIBLE_RULES = {"answer_removed_by_publisher"}


def build_suite(cfg: DataConfig) -> gx.ExpectationSuite:
    expectations = []
    for column in ("question", "answer"):
        expectations += [gxe.ExpectColumnToExist(column=column), gxe.ExpectColumnValuesToNotBeNull(column=column)]
    expectations += [
        gxe.ExpectColumnValueLengthsToBeBetween(column="question", min_value=cfg.min_question_chars,
                                                max_value=cfg.max_question_chars),
        gxe.ExpectColumnValueLengthsToBeBetween(column="answer", min_value=cfg.min_answer_chars,
                                                max_value=cfg.max_answer_chars),
        # Reported only: exact copies are dropped in preprocessing, where the rule is documented.
        gxe.ExpectColumnValuesToBeUnique(column="question", severity="warning"),
    ]
    return gx.ExpectationSuite(name="medtune_qa", expectations=expectations)


@dataclass
class Validation:
    kept: pd.DataFrame
    quarantine: list[dict]
    summary: dict
    gx_result: dict


def _wrong_types(rows: list[dict], out: list[dict]) -> list[dict]:
    good = []
    for row in rows:
        bad = [c for c in ("question", "answer") if row.get(c) is not None and not isinstance(row[c], str)]
        if bad:
            field = bad[0]
            out.append(quarantine_record(_public(row), row["_file"], row["_line"], "wrong_type",
                                         f"field '{field}' is {type(row[field]).__name__}, expected text"))
        else:
            good.append(row)
    return good


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("_")}


def run_suite(df: pd.DataFrame, suite: gx.ExpectationSuite):
    context = gx.get_context(mode="ephemeral")
    batch = (context.data_sources.add_pandas("medtune").add_dataframe_asset("qa")
             .add_batch_definition_whole_dataframe("all"))
    suite = context.suites.add(suite)
    definition = context.validation_definitions.add(gx.ValidationDefinition(name="qa", data=batch, suite=suite))
    return definition.run(batch_parameters={"dataframe": df},
                          result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW_ID]})


def validate(cfg: DataConfig) -> Validation:
    ingested: Ingested = ingest(cfg)
    quarantine = list(ingested.quarantine)
    rows = _wrong_types(ingested.rows, quarantine)
    df = pd.DataFrame(rows)
    if df.empty:
        raise DataError(_stop_message(cfg, ingested.read, 0, quarantine, "no rows left after decoding"))
    df[ROW_ID] = range(len(df))
    result = run_suite(df, build_suite(cfg))

    failed_rows: dict[int, str] = {}
    for res in result.results:
        exp = res.expectation_config
        if res.success or exp.severity == "warning" or "unexpected_index_list" not in res.result:
            continue
        reason = f"{exp.type}({exp.kwargs.get('column')})"
        for hit in res.result["unexpected_index_list"]:
            failed_rows.setdefault(int(hit[ROW_ID]), reason)
    for row_id, reason in sorted(failed_rows.items()):
        row = rows[row_id]
        quarantine.append(quarantine_record(_public(row), row["_file"], row["_line"], reason,
                                            _describe(reason, row, cfg)))
    kept = df[~df[ROW_ID].isin(failed_rows)].drop(columns=[ROW_ID]).reset_index(drop=True)

    eligible = ingested.read - sum(q["rule"] in NOT_ELIGIBLE_RULES for q in quarantine)
    summary = {
        "files": ingested.files,
        "rows_read": ingested.read,
        "rows_kept": len(kept),
        "rows_quarantined": len(quarantine),
        "quarantined_by_rule": dict(Counter(q["rule"] for q in quarantine).most_common()),
        "kept_fraction": len(kept) / eligible if eligible else 0.0,
        "duplicate_questions": int(df["question"].duplicated().sum()),
        "suite_success": bool(result.success),
    }
    # The invariant an auditor checks first: nothing is silently lost.
    assert summary["rows_read"] == summary["rows_kept"] + summary["rows_quarantined"]
    if kept.empty or summary["kept_fraction"] < cfg.min_kept_fraction:
        raise DataError(_stop_message(cfg, ingested.read, len(kept), quarantine,
                                      f"kept fraction {summary['kept_fraction']:.2f} is under the floor "
                                      f"data.min_kept_fraction={cfg.min_kept_fraction}"))
    return Validation(kept=kept, quarantine=quarantine, summary=summary, gx_result=result.to_json_dict())


def _describe(reason: str, row: dict, cfg: DataConfig) -> str:
    column = reason.split("(")[-1].rstrip(")")
    value = row.get(column)
    if value is None or value == "":
        return f"field '{column}' is empty"
    return f"field '{column}' has {len(value)} characters (bounds in data.min/max_{column}_chars)"


def _stop_message(cfg: DataConfig, read: int, kept: int, quarantine: list[dict], why: str) -> str:
    rules = Counter(q["rule"] for q in quarantine).most_common()
    lines = [f"{cfg.path}: validation stopped the run: {why}.",
             f"  rows read {read}, kept {kept}, quarantined {len(quarantine)}"]
    for rule, count in rules:
        example = next(q for q in quarantine if q["rule"] == rule)
        where = f"{example['file']}" + (f" line {example['line']}" if example["line"] else "")
        lines.append(f"  - {rule}: {count} rows, e.g. {where}: {example['detail']}")
    return "\n".join(lines)


def write_outputs(result: Validation, data_dir: Path, quarantine_path: Path, report_path: Path) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    result.kept.to_json(data_dir / "rows.jsonl", orient="records", lines=True, force_ascii=False)
    quarantine_path.parent.mkdir(parents=True, exist_ok=True)
    with quarantine_path.open("w") as fh:
        for record in result.quarantine:
            fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps({"summary": result.summary, "great_expectations": result.gx_result},
                                      indent=2, default=str))


def read_rows(data_dir: Path) -> pd.DataFrame:
    return pd.read_json(data_dir / "rows.jsonl", orient="records", lines=True, dtype=False)
