"""Identities of code and files, shared by MLflow tags, the lineage record and cluster submissions.

Light on purpose (no MLflow, no torch): `medtune submit` imports it too.
"""

from __future__ import annotations

import getpass
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
    return os.environ.get("MEDTUNE_GIT_SHA") or checkout_commit(Path(__file__).parent)


def checkout_commit(directory: Path) -> str:
    """HEAD of the checkout holding `directory`, with "-dirty" when tracked files differ from it: a run of
    uncommitted code must not claim a commit it did not run. "unknown" outside a checkout."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10).stdout

    try:
        sha = git("rev-parse", "HEAD").strip()
        changed = sha and git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{sha}-dirty" if changed else sha or "unknown"


def requester() -> str:
    """Who is asking for a run from this machine: the login name (what `whoami` prints)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return "unknown"
