"""Patterns for personal data (PHI/PII) in free text, and masking that keeps the text readable.

The patterns aim at identifiers of a person, not at every number: a bare date or a 7-digit number is
common in medical text (study years, doses, gene positions), so dates of birth and record numbers are
only matched next to their label ("DOB", "MRN").

`PATTERNS` are what the Great Expectations suite scans every row with, so they are written to be fast
with Python's regex engine: each starts with one literal or character class (which the engine can skip
to) and checks the left boundary with a look-behind afterwards. Written the obvious way (`\\b...` or a
look-behind first) they are 5-50x slower on 20 MB of answers. `_MASK_PATTERNS` cover the full span of
a match for masking, and only run on rows the scan flagged; tests check that both agree.

Masking must stay linear in the length of the text: a pattern that opens with an unbounded repeat
(`[\\w.+-]+@...`) is retried from every position of a long run and costs O(n^2) (20k characters of
letters took over a second). Such a repeat is anchored by a look-behind for the start of the run, so it is
tried once per run; tests check the structure and benchmarks/phi_mask.py prints the timings.

`redact` is what every echo of a value goes through (quarantine, reports, Data Docs, messages): masked,
control characters shown as escapes, and cut to a bounded length so a 50 MB cell echoes a few hundred.
"""

from __future__ import annotations

import re
from collections import Counter

_DATE = r"(?:\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})(?!\d)|\d{4}-\d{2}-\d{2}|[A-Z][a-z]{2,8}\.? \d{1,2},? \d{4})"
_EMAIL_DOMAIN = r"[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"
_DOB_LABEL = r"(?:DOB|D\.O\.B\.|[Dd]ate [Oo]f [Bb]irth|DATE OF BIRTH|[Bb]orn [Oo]n)"

PATTERNS: dict[str, str] = {
    # local part before the "@" is checked by the look-behind, so the scan jumps from "@" to "@"
    "email": rf"@(?<=[\w.+-]@){_EMAIL_DOMAIN}",
    # US numbers: (301) 496-5248, 301-496-5248, 301.496.5248, 1-800-784-8669, +1 800 784 8669
    "phone": r"[(\d](?<!\d\()(?<!\d\d)(?:(?<=\()\d{3}\) ?|(?<=\d)\d\d[-. ])\d{3}[-. ]\d{4}(?!\d)",
    "ssn": r"\d(?<!\d\d)\d\d-\d\d-\d{4}(?!\d)",
    "mrn": r"(?:MRN|[Mm]edical [Rr]ecord (?:[Nn]umber|[Nn]o\.?|#))\s*[:#]?\s*[A-Z]{0,3}\d{5,}\b",
    "dob": rf"{_DOB_LABEL}\s*[:,]?\s*{_DATE}",
}
_MASK_PATTERNS = {
    **PATTERNS,
    # the look-behind anchors the local part at the start of its run (see the module docstring)
    "email": rf"(?<![\w.+-])[\w.+-]+@{_EMAIL_DOMAIN}",
    "phone": r"(?<!\d)(?:\+?1[-. ]?)?(?:\(\d{3}\) ?|\d{3}[-. ])\d{3}[-. ]\d{4}(?!\d)",
}
KINDS = tuple(PATTERNS)
PLACEHOLDER = {kind: f"[{kind.upper()}]" for kind in KINDS}
_SCAN = {kind: re.compile(pattern) for kind, pattern in PATTERNS.items()}
_MASK = {kind: re.compile(pattern) for kind, pattern in _MASK_PATTERNS.items()}


def find(text: str, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """The kinds of personal data present in `text`, in pattern order."""
    return [kind for kind in kinds if _SCAN[kind].search(text)]


def mask(text: str, kinds: tuple[str, ...] = KINDS, counts: Counter | None = None) -> str:
    """Replace every match of `kinds` with its placeholder; add the number replaced to `counts`."""
    for kind in kinds:
        text, n = _MASK[kind].subn(PLACEHOLDER[kind], text)
        if counts is not None and n:
            counts[kind] += n
    return text


ECHO_CHARS = 200
# Longest personal-data token a cut may run into (an e-mail address is at most 320 characters).
_MAX_SPAN = 512
# C0/C1 control characters other than tab, newline and carriage return.
CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]"
_CONTROL = re.compile(CONTROL)


def redact(text: str, limit: int = ECHO_CHARS) -> str:
    """`text` as it may be echoed: personal data masked, control characters escaped, at most ~`limit` chars.

    The cut is moved past any personal-data match that straddles it, so no partial SSN or address is shown.
    """
    cut = limit
    if len(text) > limit:
        window = text[: limit + _MAX_SPAN]
        for pattern in _MASK.values():
            for match in pattern.finditer(window):
                if match.start() < limit < match.end():
                    cut = max(cut, match.end())
    shown = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", mask(text[:cut]))
    return shown if cut >= len(text) else f"{shown}...[{len(text) - cut} more characters]"


def redact_tree(node, limit: int = ECHO_CHARS):
    """`redact` applied to every string (keys included) of a JSON-like value."""
    if isinstance(node, str):
        return redact(node, limit)
    if isinstance(node, dict):
        return {redact_tree(k, limit) if isinstance(k, str) else k: redact_tree(v, limit) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [redact_tree(v, limit) for v in node]
    return node
