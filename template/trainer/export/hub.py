"""Upload an export folder to the Hugging Face Hub: create_repo + upload_folder, the token
from HF_TOKEN (or HUGGING_FACE_HUB_TOKEN), never logged or returned. `dry_run` lists what
would be uploaded without touching the network. `api` replaces huggingface_hub.HfApi (tests
pass an offline fake there: this machine cannot reach the Hub)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

from trainer.errors import ProjectError
from trainer.export.export_target import MARKER

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
TOKEN_VARIABLES = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


class UploadError(ProjectError):
    kind = "upload_error"


def check_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not REPO_ID.fullmatch(repo_id):
        raise UploadError(f"hf_repo_id '{repo_id}' must look like 'user-or-org/model-name'")
    return repo_id


def token() -> Optional[str]:
    return next((os.environ[name] for name in TOKEN_VARIABLES if os.environ.get(name)), None)


def require_token() -> str:
    secret = token()
    if not secret:
        raise UploadError(f"uploading needs a Hugging Face token in {' or '.join(TOKEN_VARIABLES)} "
                          "(a write token from https://huggingface.co/settings/tokens)")
    return secret


def files_of(folder: Path) -> list[str]:
    """The export's files, less its marker (which names a local path: never uploaded)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER)


def upload(folder: Path, repo_id: str, private: bool, dry_run: bool = False, api: Any = None) -> dict[str, Any]:
    check_repo_id(repo_id)
    files = files_of(folder)
    url = f"https://huggingface.co/{repo_id}"
    result = {"repo_id": repo_id, "private": private, "files": files, "url": url, "dry_run": dry_run}
    if dry_run:
        return result
    if api is None:
        secret = require_token()
        try:
            from huggingface_hub import HfApi
        except ImportError as error:
            raise UploadError("uploading needs huggingface_hub: pip install -e '.[hf]'") from error
        api = HfApi(token=secret)
    try:
        repo = api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                                   commit_message=f"Upload {folder.name}", ignore_patterns=[MARKER])
    except Exception as error:  # the Hub's errors vary; say which step failed, never the token
        raise UploadError(f"upload to {repo_id} failed: {type(error).__name__}: {error}") from None
    result["url"] = str(getattr(repo, "url", None) or url)
    result["commit"] = getattr(commit, "oid", None)
    return result
