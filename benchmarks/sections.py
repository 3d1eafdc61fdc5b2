"""A benchmark's own section of benchmarks/RESULTS.md: replaced between its markers, appended when absent."""

from __future__ import annotations

from pathlib import Path


def write_section(path: Path, begin: str, end: str, section: str) -> None:
    """`section` starts with `begin` and ends with `end`; the rest of the file is kept as it is."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in text:
        head, _, rest = text.partition(begin)
        text = head + section + rest.partition(end)[2]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.write_text(text)
