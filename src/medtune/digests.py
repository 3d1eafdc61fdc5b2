"""Identities of code and files, shared by MLflow tags, the lineage record and cluster submissions.

Light on purpose (no MLflow, no torch): `medtune submit` imports it too.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_sha() -> str:
    """The git commit of the code: from the image's build arg, else from the checkout, else unknown."""
    if os.environ.get("MEDTUNE_GIT_SHA"):
        return os.environ["MEDTUNE_GIT_SHA"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"
