"""Rows handed from step to step: one JSON object per line in `<directory>/rows.jsonl`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

FILENAME = "rows.jsonl"


def read(directory: Path) -> pd.DataFrame:
    # dtype=False: an id like "0012" stays a string
    return pd.read_json(Path(directory) / FILENAME, orient="records", lines=True, dtype=False)
