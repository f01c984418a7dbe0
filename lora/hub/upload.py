"""Publishing a staged run to the Hugging Face Hub with ``huggingface_hub``.

``publish`` stages ``hub/`` (see :mod:`lora.hub.stage`), then creates the repo and uploads the
folder in one commit named after the run. The token comes from the argument or the
environment (``HF_TOKEN``, ``HUGGING_FACE_HUB_TOKEN``, then a stored ``hf auth login``); it is
handed to ``HfApi`` only, and every message that leaves this module is scrubbed of it. Each
failure becomes one :class:`PublishError` line; the staged folder stays for a retry.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from lora.fsutil import human_size
from lora.hub.card import is_test_model
from lora.hub.runinfo import gather
from lora.hub.stage import StageArgumentError, StagedFile, StageError, stage_run, staged_files

log = logging.getLogger(__name__)

TOKEN_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
DEFAULT_ENDPOINT = "https://huggingface.co"


class PublishError(RuntimeError):
    """Publishing failed; the message is one line and never holds the token."""


class PublishArgumentError(PublishError):
    """A wrong argument (license, repo id, test-model run, base model); nothing was staged."""


@dataclass
class PublishResult:
    repo_id: str
    staged_dir: Path
    files: list[StagedFile]
    endpoint: str
    private: bool
    dry_run: bool
    commit_message: str
    url: str | None = None
    commit_url: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict:
        """What a script needs: where it went, whether it is public, and every file sent."""
        return {
            "repo_id": self.repo_id, "endpoint": self.endpoint, "private": self.private,
            "visibility": "private" if self.private else "public", "dry_run": self.dry_run,
            "url": self.url, "commit_url": self.commit_url, "staged_dir": str(self.staged_dir),
            "commit_message": self.commit_message, "total_bytes": self.total_bytes,
            "files": [{"path": f.path, "size": f.size} for f in self.files],
            "notes": list(self.notes),
        }

    def describe(self) -> str:
        """What was (or, on a dry run, would be) sent, for people."""
        head = ("dry run: nothing sent. Would create" if self.dry_run else "created")
        lines = [f"{head} {'private' if self.private else 'public'} model repo {self.repo_id} "
                 f"at {self.endpoint} and upload {len(self.files)} files "
                 f"({human_size(self.total_bytes)}) from {self.staged_dir} with commit message "
                 f"{self.commit_message!r}:"]
        width = max((len(f.path) for f in self.files), default=0)
        lines += [f"  {f.path.ljust(width)}  {human_size(f.size):>10}" for f in self.files]
        lines += [f"note: {n}" for n in self.notes]
        if self.commit_url:
            lines.append(f"commit: {self.commit_url}")
        return "\n".join(lines)


def resolve_token(token: str | None) -> str | None:
    """The explicit token, else the environment, else a stored ``hf auth login`` token."""
    if token:
        return token
    for name in TOKEN_ENV:
        if os.environ.get(name):
            return os.environ[name]
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no stored login is the common case
        return None


def _scrub(text: str, token: str | None) -> str:
    text = " ".join(str(text).split())
    return text.replace(token, "***") if token else text


def _status(exc: BaseException) -> int | None:
    """The HTTP status of a Hub error, looking through wrapped causes."""
    seen = 0
    while exc is not None and seen < 10:
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if isinstance(status, int):
            return status
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return None


def _server_message(exc: BaseException) -> str:
    seen = 0
    while exc is not None and seen < 10:
        message = getattr(exc, "server_message", None)
        if message:
            return str(message).strip().splitlines()[0]
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return ""


def _is_network_error(exc: BaseException) -> bool:
    import httpx

    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, (httpx.TransportError, ConnectionError, TimeoutError)):
            return True
        name = type(exc).__name__
        if name in ("ConnectError", "ConnectTimeout", "ReadTimeout", "RemoteDisconnected"):
            return True
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
        seen += 1
    return False


def explain(exc: BaseException, *, repo_id: str, endpoint: str, step: str,
            token: str | None) -> str:
    """One line saying what went wrong and what to do."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    status = _status(exc)
    detail = _server_message(exc)
    if isinstance(exc, OfflineModeIsEnabled) or "OfflineModeIsEnabled" in type(exc).__name__:
        msg = "HF_HUB_OFFLINE is set: unset it to publish"
    elif status == 401:
        msg = (f"the Hub rejected the token (401 Unauthorized) at {endpoint}: check HF_TOKEN "
               "(a write token is needed)")
    elif status in (403, 409):
        msg = (f"repo {repo_id} is owned by someone else or you have no write access to it "
               f"({status} at {step}); choose another --repo-id or use your own namespace")
    elif status == 404:
        msg = f"repo {repo_id} not found at {endpoint} (404 at {step})"
    elif status is not None:
        msg = f"the Hub answered HTTP {status} at {step} for {repo_id}"
    elif _is_network_error(exc):
        msg = f"cannot reach the Hub at {endpoint} ({type(exc).__name__} at {step}): check the network"
    else:
        msg = f"{step} failed for {repo_id}: {type(exc).__name__}: {exc}"
    if detail and status is not None:
        msg += f" [server: {detail}]"
    return _scrub(msg, token)


def _check_no_token_in(files: list[StagedFile], hub_dir: Path, token: str) -> None:
    """Last line of defence: never send a file that contains the token itself."""
    needle = token.encode()
    chunk = 8 * 1024 * 1024
    for f in files:
        with open(hub_dir / f.path, "rb") as fh:
            tail = b""
            while block := fh.read(chunk):
                if needle in tail + block:
                    raise PublishError(
                        f"refusing to upload: the Hub token appears in staged file {f.path}")
                tail = block[-len(needle):]


def publish(
    run_dir: Path | str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    endpoint: str | None = None,
    dry_run: bool = False,
    trigger_word: str | None = None,
    license: str | None = None,
    base_model: str | None = None,
    allow_test_model: bool = False,
    card: Path | str | None = None,
) -> PublishResult:
    """Stage ``run_dir/hub/`` and (unless ``dry_run``) upload it to ``repo_id``.

    ``private`` creates the repo as private; otherwise everything staged (LoRA files, card,
    samples, metrics, loss plot) becomes public. ``base_model``: a Hub id, or the name of a
    local checkpoint (named in the card's text only). Raises :class:`PublishArgumentError` for a
    bad argument before anything is staged, and :class:`PublishError` with one line for: no
    token, an invalid token (401), a repo owned by someone else (403/409), an unreachable Hub,
    and any other Hub error.
    """
    run_dir = Path(run_dir)
    endpoint_url = (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
    if base_model is not None and not base_model.strip():
        raise PublishArgumentError("--base-model must be a Hub id (owner/name) or a checkpoint name")
    trained_on = gather(run_dir).trained_on if run_dir.is_dir() else None
    if is_test_model(trained_on) and not (allow_test_model or dry_run):
        raise PublishArgumentError(
            f"{run_dir.name} was trained on the tiny random-weight test model (--model tiny), not "
            "SD1.5, so its LoRA is of no use to anyone; pass --allow-test-model to upload it anyway")
    try:
        kwargs = {"license": license} if license else {}
        hub_dir = stage_run(run_dir, repo_id=repo_id, trigger_word=trigger_word,
                            base_model=base_model, card=card, **kwargs)
    except StageArgumentError as exc:
        raise PublishArgumentError(str(exc)) from None
    except StageError as exc:
        raise PublishError(str(exc)) from None
    try:
        files = staged_files(hub_dir)
    except StageError as exc:
        raise PublishError(str(exc)) from None
    run_name = run_dir.name
    result = PublishResult(
        repo_id=repo_id, staged_dir=hub_dir, files=files, endpoint=endpoint_url,
        private=private, dry_run=dry_run,
        commit_message=f"Upload LoRA from run {run_name}",
    )
    if is_test_model(trained_on) and not allow_test_model:
        result.notes.append("trained on the tiny test model: a real upload needs --allow-test-model")
    if dry_run:
        log.info("dry run: staged %d files (%s) in %s; nothing sent", len(files),
                 human_size(result.total_bytes), hub_dir)
        log.debug("%s", result.describe())
        return result

    secret = resolve_token(token)
    if not secret:
        raise PublishError(
            "no Hugging Face token: set HF_TOKEN (a write token from "
            "https://huggingface.co/settings/tokens); staged files are in " + str(hub_dir))
    _check_no_token_in(files, hub_dir, secret)

    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint_url, token=secret)
    step = "create_repo"
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        step = "upload_folder"
        # Exactly the staged files (the ledger), never whatever else is in the folder.
        info = api.upload_folder(folder_path=str(hub_dir), repo_id=repo_id, repo_type="model",
                                 commit_message=result.commit_message,
                                 allow_patterns=[glob.escape(f.path) for f in files])
    except Exception as exc:  # noqa: BLE001 - every failure becomes one clear line
        message = explain(exc, repo_id=repo_id, endpoint=endpoint_url, step=step, token=secret)
        log.debug("publish failed: %s", message)
        raise PublishError(f"{message} (staged files kept in {hub_dir})") from None
    result.url = str(repo_url)
    result.commit_url = getattr(info, "commit_url", None) or str(info)
    log.info("published %d files to %s (%s)", len(files), repo_id, result.commit_url)
    return result
