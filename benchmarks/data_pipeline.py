"""Time ingest + validation + preprocessing on the full MedQuAD collection and check its row accounting.

    .venv/bin/python benchmarks/data_pipeline.py [--config configs/local.yaml] [--set key=value ...]

Reads ../shared/data/medquad (all 12 subsets, including the three whose answers the publisher removed),
runs the same library calls as the pipeline's validate_data and preprocess steps, and prints rows/second
and wall seconds per stage. MedQuAD quotes organisations' phone numbers and e-mail addresses (NIH help
lines), so those PHI kinds are masked rather than blocked here, and the token budget and answer length
bounds are opened up so that the quarantine holds exactly the answerless rows and the duplicates.
Goal: at most 60 s on the 2-core development machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MEDQUAD = ROOT.parent / "shared" / "data" / "medquad"
MEDQUAD_SETTINGS = [
    f"data.path={MEDQUAD}",
    "data.phi.email=mask",
    "data.phi.phone=mask",
    "data.min_kept_fraction=0.9",
    "preprocess.max_tokens=100000",
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", action="store_true", help="Print the figures as one JSON line too.")
    args = parser.parse_args(argv)

    from medtune import config, models, preprocess, validate

    if not MEDQUAD.exists():
        sys.exit(f"{MEDQUAD}: MedQuAD not found (see the README of ../shared/data/medquad)")
    cfg = config.load(args.config, [*MEDQUAD_SETTINGS, *args.overrides])
    tokenizer = models.load_tokenizer(cfg.model)  # outside the timing: a cached model load, not data work

    start = time.perf_counter()
    checked = validate.validate(cfg.data, tokenizer)
    validated = time.perf_counter()
    prepared = preprocess.prepare(checked.kept, tokenizer, cfg.preprocess)
    done = time.perf_counter()

    v, p = checked.summary, prepared.summary
    quarantine_by_rule = {**v["quarantined_by_rule"], **{k: n for k, n in p["dropped_by_rule"].items() if n}}
    figures = {
        "rows_read": v["rows_read"],
        "rows_kept_after_validation": v["rows_kept"],
        "rows_in_splits": p["rows_out"],
        "quarantined_total": v["rows_quarantined"] + p["rows_dropped"],
        "quarantined_by_rule": quarantine_by_rule,
        "conflicting_duplicate_questions": p["conflicting_duplicate_questions"],
        "phi_masked": v["phi_masked"],
        "splits": p["splits"],
        "topics_per_split": p["topics"],
        "seconds": {"validate": round(validated - start, 2), "preprocess": round(done - validated, 2),
                    "total": round(done - start, 2)},
        "rows_per_second": round(v["rows_read"] / (done - start), 1),
    }
    # counts in = kept + quarantined, across both stages
    assert figures["rows_read"] == figures["rows_in_splits"] + figures["quarantined_total"], figures
    _print(figures)
    if args.json:
        print(json.dumps(figures))
    return figures


def _print(f: dict) -> None:
    print(f"MedQuAD: read {f['rows_read']} rows, {f['rows_in_splits']} in splits, "
          f"{f['quarantined_total']} quarantined")
    for rule, count in f["quarantined_by_rule"].items():
        print(f"  quarantined {rule:<40} {count:>6}")
    print(f"  conflicting duplicate questions: {f['conflicting_duplicate_questions']}; PHI masked: {f['phi_masked']}")
    for name, split in f["splits"].items():
        print(f"  {name:<10} {split['rows']:>6} rows, {f['topics_per_split'][name]:>5} topics, "
              f"sha256 {split['fingerprint'][:16]}")
    s = f["seconds"]
    print(f"wall seconds: validate {s['validate']}, preprocess {s['preprocess']}, total {s['total']} "
          f"({f['rows_per_second']} rows/s)")


if __name__ == "__main__":
    main()
