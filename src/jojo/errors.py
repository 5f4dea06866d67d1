"""User-facing errors.

A `JojoError` is a problem with the user's input (a missing file, a config typo, a checkpoint made with
another tokenizer). The CLI prints its message as one line on stderr and exits non-zero, with no
traceback. Messages name the problem and the fix.

A failure of the user's environment is the other kind of error a user can fix: a full disk, a folder without
write permission, a read-only file system, an output path through a regular file, too many open files, too
little memory. `environment_message` turns exactly these into one line naming the path and the fix; anything
else (any other errno, any other exception) is a bug and keeps its traceback. Code that knows what it was
writing when a write failed says so with `annotate` (the OS only knows the file name, often not even that:
a `write()` that hits a full disk raises ENOSPC without a file name).
"""

from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path

# The errno classes that are the environment's fault, never a bug.
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NO_PERMISSION = {errno.EACCES, errno.EPERM}
READ_ONLY = {errno.EROFS}
NOT_A_DIRECTORY = {errno.ENOTDIR}
TOO_MANY_FILES = {errno.EMFILE, errno.ENFILE}
ENVIRONMENT_ERRNOS = NO_SPACE | NO_PERMISSION | READ_ONLY | NOT_A_DIRECTORY | TOO_MANY_FILES

# Libraries written in Rust (safetensors, tokenizers) report an OS error only in their message: "... No space
# left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TRIED = re.compile(r"(?:[Tt]ried to allocate|[Uu]nable to allocate)\s+([\d.]+\s*[KMGTP]?i?B|\d+ bytes)")


class JojoError(Exception):
    """An error caused by input the user can fix; printed as one line, exit status 2."""


def ensure_dir(path) -> Path:
    """mkdir -p `path`. Where `path` itself is a regular file, raise NotADirectoryError (ENOTDIR, what open() and
    mkdir give for a file further up) instead of mkdir's FileExistsError, so every "a file is in the way" case
    reaches the CLI as the one environment error it reports in one line."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        if path.is_dir():  # made by someone else meanwhile
            return path
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None
    return path


def annotate(exc: BaseException, *, doing: str | None = None, path=None, after: str | None = None) -> BaseException:
    """Attach what was being done when `exc` happened (and what is left afterwards), for `environment_message`.

    doing: e.g. "writing checkpoint step-000040 (optimizer.pt)"; path: the file or folder concerned; after: what
    the user still has, e.g. "the last complete checkpoint is R/step-000030". The innermost caller knows best,
    so a field already set is kept."""
    for name, value in (("doing", doing), ("path", path), ("after", after)):
        if value is not None and getattr(exc, f"jojo_{name}", None) is None:
            try:
                setattr(exc, f"jojo_{name}", str(value))
            except AttributeError:  # an exception type with __slots__: no context, the message stays generic
                pass
    return exc


def environment_error(exc: BaseException) -> OSError | None:
    """The environment OSError behind `exc`: `exc` itself, one in its __cause__/__context__ chain (torch.save
    wraps a failed write in a RuntimeError), or one a Rust library reported in its message; else None."""
    seen = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in ENVIRONMENT_ERRNOS:
            return cur
        match = _RUST_OS_ERROR.search(str(cur)) if not isinstance(cur, OSError) else None
        if match and int(match.group(1)) in ENVIRONMENT_ERRNOS:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        cur = cur.__cause__ or cur.__context__
    return None


def is_out_of_memory(exc: BaseException) -> bool:
    """MemoryError (Python, NumPy), torch's OutOfMemoryError (CUDA) and torch's CPU allocator failure, which is
    a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes")."""
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(exc, oom):
        return True
    if type(exc) is RuntimeError:
        text = str(exc)
        return "can't allocate memory" in text or "out of memory" in text.lower()
    return False


def _size(text: str) -> str | None:
    match = _TRIED.search(text)
    if not match:
        return None
    size = match.group(1)
    if size.endswith(" bytes"):
        n = int(size.split()[0])
        return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
    return size


def _blocker(path: str) -> str | None:
    """The part of `path` that is a regular file where a folder is needed (ENOTDIR)."""
    p = os.path.abspath(path)
    while True:
        parent = os.path.dirname(p)
        if os.path.lexists(p) and not os.path.isdir(p):
            return p
        if parent == p:
            return None
        p = parent


def _folder(path: str) -> str:
    return path if os.path.isdir(path) else os.path.dirname(path) or "."


def environment_message(exc: BaseException, reduce: str | None = None, where=None) -> str | None:
    """One line for a failure of the user's environment, or None when `exc` is not one (a bug: let it raise).

    reduce: what to make smaller when memory runs out (the command knows: --batch-size, --max-tokens, ...);
    where: the command's output path, named when nothing closer to the failure is known."""
    if is_out_of_memory(exc):
        size = _size(str(exc))
        asked = f"an allocation of {size} failed" if size else "an allocation failed"
        doing = getattr(exc, "jojo_doing", None)
        fix = reduce or "free memory (close other programs) or use a machine with more"
        return f"out of memory: {asked}{f' while {doing}' if doing else ''}; {fix}"
    err = environment_error(exc)
    if err is None:
        return None
    named = getattr(exc, "jojo_path", None) or getattr(err, "jojo_path", None)  # the folder a writer named
    path = named or err.filename or where
    doing = getattr(exc, "jojo_doing", None) or getattr(err, "jojo_doing", None)
    after = getattr(exc, "jojo_after", None) or getattr(err, "jojo_after", None)
    path = os.fspath(path) if path is not None else None
    while_ = f" while {doing}" if doing else ""
    tail = f"; {after}" if after else ""
    code = err.errno
    if code in NO_SPACE:
        what = "disk quota exceeded" if code == errno.EDQUOT else "no space left on the device"
        holding = f" holding {named or _folder(path)}" if path else ""
        return f"{what}{holding}{while_}{tail}; free space there (or write somewhere else) and run again"
    if code in READ_ONLY:
        return (
            f"read-only file system: cannot write {path or 'the output'}{while_}{tail}; "
            "choose a location on a writable disk"
        )
    if code in NO_PERMISSION:
        reason = "permission denied" if code == errno.EACCES else "operation not permitted"
        fix = "give this user access to it (chmod/chown) or choose another location"
        if code == errno.EPERM:
            fix += " (an immutable file or folder: see lsattr)"
        return f"{reason}: {path or 'a file'}{while_}{tail}; {fix}"
    if code in NOT_A_DIRECTORY:
        blocker = _blocker(path) if path else None
        if blocker:
            return (
                f"cannot use {path}{while_}: {blocker} is a file, not a folder{tail}; "
                "choose a path whose parents are folders"
            )
        return f"not a directory: {path or 'a path'}{while_}{tail}; choose a path whose parents are folders"
    # TOO_MANY_FILES
    return (
        f"too many open files{f' ({path})' if path else ''}{while_}{tail}; raise the limit (ulimit -n 4096) "
        "or use fewer processes (--workers)"
    )
