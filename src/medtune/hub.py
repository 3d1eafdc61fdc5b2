"""Push a gated adapter to the Hugging Face Hub, or record why it was not pushed."""

from __future__ import annotations

import os
from pathlib import Path

from medtune.config import Config


def push(cfg: Config, adapter_dir: Path, run_id: str, decision: dict) -> dict:
    token = os.environ.get(cfg.hub.token_env)
    if not cfg.hub.repo_id:
        return {"pushed": False, "reason": "hub.repo_id is not set"}
    if not token:
        return {"pushed": False, "reason": f"no token in ${cfg.hub.token_env}"}
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(cfg.hub.repo_id, private=cfg.hub.private, exist_ok=True)
    commit = api.upload_folder(repo_id=cfg.hub.repo_id, folder_path=str(adapter_dir),
                               commit_message=f"medtune run {run_id}: {decision['summary']}")
    return {"pushed": True, "repo_id": cfg.hub.repo_id, "commit": commit.oid, "url": commit.commit_url}
