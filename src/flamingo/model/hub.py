"""Sharing model directories on the Hugging Face Hub: `push_to_hub` uploads one through
huggingface_hub's commit API, its model card naming the repository it lands in. Loading is
`load_model("org/name", revision=...)` (flamingo.model.weights)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flamingo.errors import UserError
from flamingo.model.card import CARD_FILE, render_card, with_model_id
from flamingo.model.config import FlamingoConfig


class HubError(UserError):
    """A model directory cannot be pushed (not a model directory, a bad repository id, the Hub refused)."""


def _model_files(model_dir: Path) -> list[Path]:
    """The files to upload: everything in the directory but hidden files (staging leftovers,
    .cache) and the card, which is uploaded with the repository id in it."""
    return sorted(p for p in model_dir.rglob("*") if p.is_file() and p.relative_to(model_dir) != Path(CARD_FILE)
                  and not any(part.startswith(".") for part in p.relative_to(model_dir).parts))


def push_to_hub(model_dir: str | Path, repo_id: str, *, revision: str | None = None, private: bool | None = None,
                token: str | None = None, commit_message: str | None = None, api: Any = None) -> str:
    """Upload the saved model directory `model_dir` (config.yaml, bridge.safetensors, provenance,
    adapters, ...) to the Hub model repository `repo_id` (created when missing) in one commit,
    on branch `revision` (default main). The card README.md goes up with its usage section naming
    `repo_id` (a directory without a card gets one). Returns the commit's URL. `api`: an
    `huggingface_hub.HfApi` to use (default: a new one with `token`)."""
    from flamingo.model.card import is_hub_id
    from flamingo.model.weights import CONFIG_FILE, PROVENANCE_FILE, WEIGHTS_FILE, read_provenance

    model_dir = Path(model_dir)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (model_dir / name).is_file()]
    if not model_dir.is_dir() or missing:
        raise HubError(f"{model_dir} is not a saved Flamingo model directory (no {', '.join(missing) or 'folder'})")
    if not is_hub_id(repo_id):
        raise HubError(f"repository id {repo_id!r}: expected 'org/name' (or 'user/name')")
    card_path = model_dir / CARD_FILE
    card = (card_path.read_text(encoding="utf-8") if card_path.is_file() else
            render_card(FlamingoConfig.load(model_dir / CONFIG_FILE),
                        read_provenance(model_dir) if (model_dir / PROVENANCE_FILE).is_file() else None))
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = api or HfApi(token=token)
    operations = [CommitOperationAdd(path_in_repo=str(p.relative_to(model_dir).as_posix()), path_or_fileobj=str(p))
                  for p in _model_files(model_dir)]
    operations.append(CommitOperationAdd(path_in_repo=CARD_FILE,
                                         path_or_fileobj=with_model_id(card, repo_id).encode("utf-8")))
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.create_commit(repo_id, operations, repo_type="model", revision=revision,
                                   commit_message=commit_message or f"Upload Flamingo model from {model_dir.name}")
    except (HfHubHTTPError, OSError, ValueError) as err:  # no token, no access, offline: one line
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        raise HubError(f"pushing {model_dir} to {repo_id} failed: {reason}") from None
    return str(getattr(commit, "commit_url", commit))
