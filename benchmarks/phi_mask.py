"""Print how PHI masking scales with the length of one text (it must be linear).

    .venv/bin/python benchmarks/phi_mask.py [--repeat 5]

The worst input for an e-mail pattern is a long run of characters that may form a local part but hold no
"@": the pattern used before issue 20 (`[\\w.+-]+@...`) retried the run from every position. Prints the
median seconds of `phi.mask` and `phi.redact` per length, and the old pattern next to the new one for the
lengths where the old one still finishes in seconds.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time

from medtune import phi

OLD_EMAIL = re.compile(r"[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
LENGTHS = (5_000, 10_000, 20_000, 200_000)
OLD_UP_TO = 20_000


def median_seconds(fn, text: str, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn(text)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"{'chars':>8} {'input':<10} {'mask s':>9} {'redact s':>9} {'old email s':>12} {'old/new':>8}")
    for n in LENGTHS:
        for name, text in (("letters", "a" * n), ("digits", "1" * n), ("words", ("lorem ipsum 12 " * n)[:n])):
            new = median_seconds(phi.mask, text, args.repeat)
            cut = median_seconds(phi.redact, text, args.repeat)
            old = median_seconds(lambda t: OLD_EMAIL.sub("[EMAIL]", t), text, 1) if n <= OLD_UP_TO else None
            old_s, ratio = (f"{old:12.4f}", f"{old / new:8.1f}") if old is not None else (f"{'-':>12}", f"{'-':>8}")
            print(f"{n:>8} {name:<10} {new:9.4f} {cut:9.5f} {old_s} {ratio}")


if __name__ == "__main__":
    main()
