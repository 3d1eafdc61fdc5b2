"""Push a gated adapter (and its merged export) with model cards to the Hugging Face Hub, or record why not.

One commit per pipeline run and repo, tagged `run-<run id>` and `v<registered model version>`: a second push
of the same run finds the run tag and does nothing. The token is read from the environment variable the
config names and never logged.
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


def version_tag(registration: dict) -> str:
    return f"v{registration['version']}"


def merged_repo_id(repo_id: str) -> str:
    """The merged export gets a repo of its own, so serving stacks load it from the repo root."""
    return f"{repo_id}-merged"


def push(cfg: Config, adapter_dir: Path, run_id: str, decision: dict, cards: dict[str, str],
         registration: dict | None = None) -> dict:
    """Push the adapter (and `adapter_dir/merged`, when exported) with their model cards.

    `cards` holds the README.md for "adapter" and, with a merged export, for "merged". Each commit is tagged
    `run-<run id>` (what makes a repeat push a no-op) and `v<model version>` when the run was registered.
    """
    if not decision.get("passed"):
        return {"pushed": False, "reason": "the gate did not pass"}
    if not cfg.hub.repo_id:
        return {"pushed": False, "reason": "hub.repo_id is not set"}
    token = _token(cfg)
    if not token:
        return {"pushed": False, "reason": f"no token in ${cfg.hub.token_env} or $HF_TOKEN_PATH"}
    from huggingface_hub import HfApi

    api = HfApi(token=token, endpoint=cfg.hub.endpoint)
    what = f"medtune run {run_id}: gate passed" + (
        f", {registration['name']} version {registration['version']}" if registration else "")
    tags = [version_tag(registration)] if registration else []
    result = _push_folder(api, cfg, cfg.hub.repo_id, adapter_dir, cards["adapter"], run_id, tags, what,
                          decision.get("summary", ""))
    merged = adapter_dir / "merged"
    if merged.is_dir():
        result["merged"] = _push_folder(api, cfg, merged_repo_id(cfg.hub.repo_id), merged, cards["merged"],
                                        run_id, tags, what, decision.get("summary", ""))
    return result


def _token(cfg: Config) -> str | None:
    """$<hub.token_env>, else what huggingface_hub finds: the file at $HF_TOKEN_PATH (a Secret mounted as a
    file) or a `hf auth login` on a workstation."""
    from huggingface_hub import get_token

    return os.environ.get(cfg.hub.token_env) or get_token()


def _push_folder(api, cfg: Config, repo: str, folder: Path, card: str, run_id: str, tags: list[str],
                 message: str, description: str) -> dict:
    _retry(lambda: api.create_repo(repo, private=cfg.hub.private, exist_ok=True), "create_repo")
    tag = run_tag(run_id)
    existing = {t.name: t.target_commit for t in _retry(lambda: api.list_repo_refs(repo).tags, "list_repo_refs")}
    if tag in existing:
        return {"pushed": False, "reason": f"run already pushed (tag {tag})", "repo_id": repo,
                "commit": existing[tag], "tags": [t for t in [tag, *tags] if t in existing]}
    with tempfile.TemporaryDirectory() as staging:
        upload = Path(staging) / "upload"
        # The merged export is a repo of its own (see merged_repo_id), not a sub-folder of the adapter's.
        shutil.copytree(folder, upload, ignore=shutil.ignore_patterns("merged"))
        (upload / "README.md").write_text(card)
        files = sorted(str(p.relative_to(upload)) for p in upload.rglob("*") if p.is_file())
        commit = _retry(lambda: api.upload_folder(repo_id=repo, folder_path=str(upload), commit_message=message,
                                                  commit_description=description), "upload_folder")
    # The run tag goes last: it marks the push complete, so a retry after a failure in between redoes it.
    for name in [*tags, tag]:
        _retry(lambda name=name: api.create_tag(repo, tag=name, revision=commit.oid, tag_message=message,
                                                exist_ok=True), "create_tag")
    return {"pushed": True, "repo_id": repo, "commit": commit.oid, "url": commit.commit_url,
            "tags": [*tags, tag], "files": files}


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
