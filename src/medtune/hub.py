"""Push a gated adapter and its model card to the Hugging Face Hub, or record why it was not pushed.

One commit per pipeline run, tagged `run-<run id>`: a second push of the same run finds the tag and does
nothing. The token is read from the environment variable the config names and never logged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from medtune.config import Config

log = logging.getLogger(__name__)
ATTEMPTS = 4


def run_tag(run_id: str) -> str:
    return f"run-{run_id}"


def push(cfg: Config, adapter_dir: Path, run_id: str, decision: dict, model_card: str) -> dict:
    if not decision.get("passed"):
        return {"pushed": False, "reason": "the gate did not pass"}
    if not cfg.hub.repo_id:
        return {"pushed": False, "reason": "hub.repo_id is not set"}
    token = os.environ.get(cfg.hub.token_env)
    if not token:
        return {"pushed": False, "reason": f"no token in ${cfg.hub.token_env}"}
    from huggingface_hub import HfApi

    api = HfApi(token=token, endpoint=cfg.hub.endpoint)
    repo = cfg.hub.repo_id
    _retry(lambda: api.create_repo(repo, private=cfg.hub.private, exist_ok=True), "create_repo")
    tag = run_tag(run_id)
    existing = {t.name: t.target_commit for t in _retry(lambda: api.list_repo_refs(repo).tags, "list_repo_refs")}
    if tag in existing:
        return {"pushed": False, "reason": f"run already pushed (tag {tag})", "repo_id": repo,
                "commit": existing[tag], "tag": tag}
    with tempfile.TemporaryDirectory() as staging:
        folder = Path(staging) / "upload"
        shutil.copytree(adapter_dir, folder)
        (folder / "README.md").write_text(model_card)
        commit = _retry(lambda: api.upload_folder(
            repo_id=repo, folder_path=str(folder),
            commit_message=f"medtune run {run_id}: gate passed",
            commit_description=decision.get("summary", "")), "upload_folder")
    _retry(lambda: api.create_tag(repo, tag=tag, revision=commit.oid, tag_message=f"medtune run {run_id}",
                                  exist_ok=True), "create_tag")
    return {"pushed": True, "repo_id": repo, "commit": commit.oid, "url": commit.commit_url, "tag": tag,
            "files": sorted(p.name for p in adapter_dir.iterdir() if p.is_file()) + ["README.md"]}


def _retry(call, what: str):
    """Retry transient failures (connection errors, 429, 5xx) with exponential backoff; others raise at once."""
    from huggingface_hub.errors import HfHubHTTPError

    for attempt in range(1, ATTEMPTS + 1):
        try:
            return call()
        except (HfHubHTTPError, OSError) as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            transient = status is None or status == 429 or status >= 500
            if not transient or attempt == ATTEMPTS:
                raise
            delay = 2 ** attempt
            log.warning("Hub %s failed (%s); retrying in %ss", what, status or type(exc).__name__, delay)
            time.sleep(delay)
