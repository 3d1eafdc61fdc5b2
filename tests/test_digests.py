"""Code identity: the commit a run claims must be the code it ran."""

from __future__ import annotations

import subprocess

from medtune import digests


def _git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=repo, check=True,
                   capture_output=True)


def test_checkout_commit_marks_uncommitted_changes(tmp_path):
    assert digests.checkout_commit(tmp_path) == "unknown"  # not a checkout
    _git(tmp_path, "init", "-q")
    (tmp_path / "train.py").write_text("lr = 3e-4\n")
    _git(tmp_path, "add", "train.py")
    _git(tmp_path, "commit", "-qm", "one")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert digests.checkout_commit(tmp_path) == head and len(head) == 40

    (tmp_path / "notes.txt").write_text("untracked files are not the code that ran\n")
    assert digests.checkout_commit(tmp_path) == head

    (tmp_path / "train.py").write_text("lr = 3e-3\n")
    assert digests.checkout_commit(tmp_path) == f"{head}-dirty"


def test_image_build_arg_wins(monkeypatch):
    monkeypatch.setenv("MEDTUNE_GIT_SHA", "a" * 40)
    assert digests.git_sha() == "a" * 40
