"""Upload a checkpoint to the Hugging Face Hub as a transformers repository (optionally with a GGUF file).

The order is chosen so that failures come early and cheap: the repository name, the token and the network
are checked before any conversion, and the network check runs under a short deadline (huggingface_hub's
own HTTP client has no timeout, so a black-holed connection would otherwise hang). `dry_run` converts and
writes everything to a folder and uploads nothing, so it needs neither a token nor a network.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from pathlib import Path

from jojo.errors import JojoError

NETWORK_TIMEOUT_S = 15.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _with_deadline(fn, seconds: float, what: str):
    """Run fn() in a daemon thread; a JojoError if it has not returned within `seconds`."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise JojoError(f"no answer from the Hugging Face Hub within {seconds:.0f} s while {what}; check the network")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _hub_error(exc: BaseException, what: str) -> JojoError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status == 401:
        return JojoError(f"the Hugging Face Hub rejected the token while {what} (401); run `hf auth login` again")
    if status == 403:
        return JojoError(f"the token may not write there while {what} (403); use a token with write access")
    text = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
    return JojoError(
        f"cannot reach the Hugging Face Hub while {what} ({type(exc).__name__}: {text}); "
        "check the network, or use --dry-run"
    )


def check_access(token: str | None = None) -> tuple[str, str]:
    """-> (token, user name), or a one-line JojoError for offline mode, a missing token or no network."""
    if _offline():
        raise JojoError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it, or use --dry-run")
    try:
        from huggingface_hub import HfApi, get_token
    except ImportError:
        raise JojoError("uploading needs huggingface_hub: pip install 'jojo[export]'") from None
    token = token or get_token()
    if not token:
        raise JojoError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access); "
            "or use --dry-run to only convert"
        )
    try:
        who = _with_deadline(lambda: HfApi(token=token).whoami(token=token), NETWORK_TIMEOUT_S, "checking the token")
    except JojoError:
        raise
    except Exception as exc:
        raise _hub_error(exc, "checking the token") from None
    return token, who.get("name") or ""


def upload(
    ckpt: str | Path,
    repo_name: str,
    organization: str | None = None,
    private: bool = False,
    dry_run: bool = False,
    out: str | Path | None = None,
    dtype: str = "fp32",
    gguf_type: str | None = None,
) -> tuple[str, Path]:
    """Convert `ckpt` into a Hub-ready folder and push it to ORG/NAME (or USER/NAME). -> (repo id, folder)."""
    from jojo.export.hf import export_hf

    if not _NAME.match(repo_name):
        raise JojoError(
            f"invalid --repo-name {repo_name!r}: use letters, digits, '-', '_' and '.' only "
            "(put the owner in --organization)"
        )
    if organization is not None and not _NAME.match(organization):
        raise JojoError(f"invalid --organization {organization!r}")
    token = None
    owner = organization
    if not dry_run:
        token, user = check_access()
        owner = organization or user
    repo_id = f"{owner or 'YOUR_USERNAME'}/{repo_name}"
    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix=f"jojo-upload-{repo_name}-")) / repo_name
    export_hf(ckpt, folder, dtype=dtype, repo_id=repo_id, gguf_type=gguf_type)
    if dry_run:
        return repo_id, folder
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            commit_message=f"Upload {repo_name} from Jojo",
        )
    except Exception as exc:
        raise _hub_error(exc, f"uploading to {repo_id}") from None
    return str(url), folder
