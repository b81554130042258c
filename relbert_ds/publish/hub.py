"""Publishing an exported model to the Hugging Face hub with its full model card.

    from relbert_ds.publish.hub import push_to_hub
    push_to_hub("runs/default/best_model", "me/relbert-minilm", results="runs/default/results.json")

What is uploaded: every file of the exported folder, except that README.md is replaced by the
full card (:func:`relbert_ds.publish.model_card.card_from_folder`: metadata with ``model-index``, recipe,
results, usage, citation). The card travels as bytes in the commit, so the local folder is only
read, never written. One commit through ``HfApi.create_repo`` + ``HfApi.create_commit`` (what
``upload_folder`` does underneath, minus its folder walk, which would send the local README).

Every failure a user can cause (no token, the repo exists, the hub unreachable or refusing, the
folder not an export, offline mode on) is a :class:`~relbert_ds.errors.HubError` with one line.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from relbert_ds.errors import HubError, UserError
from relbert_ds.publish.model_card import DEFAULT_LICENSE, card_from_folder, read_training_record

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_SKIP_PARTS = (".git", ".cache")  # never uploaded (the hub library skips them too)
_NETWORK_MODULES = {"httpx", "httpx2", "httpcore", "requests", "urllib3"}


@dataclass
class PushResult:
    """Where the model went."""

    repo_id: str
    repo_url: str
    commit_url: str
    files: list[str]  # paths in the repo, README.md included


def export_files(folder: Path) -> list[tuple[str, Path]]:
    """(path in repo, local path) of every file to upload, README.md excluded (the card replaces it)."""
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        skipped = any(part.startswith(_SKIP_PARTS) for part in rel.parts) or rel.as_posix() == "README.md"
        if path.is_file() and not skipped:
            out.append((rel.as_posix(), path))
    return out


def check_export(folder: Union[str, Path]) -> Path:
    """The folder, if it is a relbert-ds export with weights; HubError otherwise."""
    folder = Path(folder).expanduser()
    try:
        read_training_record(folder)
    except UserError as exc:
        raise HubError(str(exc)) from exc
    if not any(folder.glob("*.safetensors")) and not (folder / "pytorch_model.bin").is_file():
        raise HubError(f"{folder} has no model weights (*.safetensors or pytorch_model.bin); fix: export the model "
                       f"again (the trainer writes <run>/model and <run>/best_model)")
    return folder


def resolve_token(token: Optional[str]) -> str:
    """The token given, else HF_TOKEN / the saved login; HubError when there is none."""
    import huggingface_hub

    token = token or huggingface_hub.get_token()
    if not token:
        raise HubError("no Hugging Face token; fix: set HF_TOKEN to a write token (https://huggingface.co/settings/"
                       "tokens), run `hf auth login`, or pass --token")
    return token


def push_to_hub(folder: Union[str, Path], repo_id: str, token: Optional[str] = None, private: bool = False,
                endpoint: Optional[str] = None, results: Optional[Union[str, Path]] = None, exist_ok: bool = False,
                license: str = DEFAULT_LICENSE, commit_message: Optional[str] = None,
                revision: Optional[str] = None) -> PushResult:
    """Create ``repo_id`` on the hub and upload the exported ``folder`` with its full model card.

    ``results``: a ``relbert-ds-evaluate --output`` JSON whose metrics go into the card's
    ``model-index`` and results table (without it, the export's validation numbers are used).
    ``endpoint``: the hub's address (default: HF_ENDPOINT, else huggingface.co). ``exist_ok``:
    add a commit to an existing repo instead of refusing. The local folder is never modified.
    """
    folder = check_export(folder)
    if not _REPO_ID.match(repo_id or "") or ".." in repo_id or "--" in repo_id:
        raise HubError(f"{repo_id!r} is not a hub repo id; fix: pass NAME or USER_OR_ORG/NAME (letters, digits, "
                       f"'-', '_', '.')")
    try:
        card = card_from_folder(folder, results=results, repo_id=repo_id, license=license)
    except UserError as exc:
        raise HubError(str(exc)) from exc
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("Hugging Face offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set); fix: unset "
                       "both to publish")
    token = resolve_token(token)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    files = export_files(folder)
    try:
        if "/" not in repo_id:  # a bare name lives under the token's user: the card names the full id
            repo_id = f"{api.whoami()['name']}/{repo_id}"
            card = card_from_folder(folder, results=results, repo_id=repo_id, license=license)
        repo_url = api.create_repo(repo_id, private=private, exist_ok=exist_ok, repo_type="model")
        operations = [CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path)) for rel, path in files]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        commit = api.create_commit(repo_id, operations=operations, repo_type="model", revision=revision,
                                   commit_message=commit_message or f"Upload {folder.name} with relbert-ds-push")
    except Exception as exc:  # noqa: BLE001 - every hub or network failure becomes one line; bugs re-raise
        raise _hub_error(exc, repo_id, endpoint) from exc
    return PushResult(repo_id=repo_id, repo_url=str(repo_url), commit_url=str(commit.commit_url),
                      files=[rel for rel, _ in files] + ["README.md"])


def _hub_error(exc: Exception, repo_id: str, endpoint: str) -> Exception:
    """A HubError for what the hub or the network said; any other exception unchanged (a bug)."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(exc, HfHubHTTPError):
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        said = _server_message(exc)
        if status == 409:
            return HubError(f"the repo {repo_id} already exists on {endpoint}; fix: pass --exist_ok to add a commit "
                            f"to it, or choose another repo id")
        if status in (401, 403):
            return HubError(f"{endpoint} refused the token for {repo_id} (HTTP {status}: {said}); fix: use a token "
                            f"with write access to that user or organisation")
        return HubError(f"{endpoint} answered HTTP {status} for {repo_id}: {said}; fix: check the repo id and "
                        f"retry later")
    if _is_network_error(exc):
        return HubError(f"cannot reach the hub at {endpoint} ({type(exc).__name__}: {_one_line(exc)}); fix: check "
                        f"the network connection, or --endpoint / HF_ENDPOINT")
    return exc


def _is_network_error(exc: BaseException) -> bool:
    roots = {cls.__module__.split(".")[0] for cls in type(exc).__mro__}
    return bool(roots & _NETWORK_MODULES) or isinstance(exc, (ConnectionError, TimeoutError))


def _server_message(exc: Any) -> str:
    response = getattr(exc, "response", None)
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("error"):
            return _one_line(body["error"])
    except Exception:  # noqa: BLE001 - a non-JSON body: fall back to the exception text
        pass
    return _one_line(exc)


def _one_line(value: Any) -> str:
    text = " ".join(str(value).split())
    return text[:300] + ("..." if len(text) > 300 else "")
