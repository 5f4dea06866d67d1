"""One writer per run directory.

`jojo train` and `jojo sft` (fresh or `--resume`) take RUN_DIR/.jojo.lock before they write anything into the
run directory, and release it on every exit: the end of the run, an error, Ctrl+C. A second writer is refused
with one line naming the process that holds it. Read-only commands (generate, chat, export) never take it, so
they keep working while a run trains.

The lock is the operating system's: `fcntl.flock(LOCK_EX | LOCK_NB)` on the lock file. The kernel drops it when
the process dies, kill -9 included, so a dead run never blocks its directory. The file also records who holds
it (pid, host, command, start time), for the messages only: a second writer is told "pid N (jojo train ...)",
and a record left by a process that died without releasing (the file is there but nobody holds the flock) is
reported in one line when the next run takes it over.

Traps:
- The file is removed on release, so a finished run leaves no lock behind. Removing a locked file races with a
  process that opened it just before: that process would then lock an inode no longer in the directory. So
  after each flock we check that the path still names the inode we locked, and start again if not.
- A flock belongs to the open file description: a child forked while it is held keeps it. Training forks no
  long-lived children; the descriptor is close-on-exec, so exec'd helpers do not inherit it.
- Under torchrun only rank 0 takes the lock (it alone writes the run directory).
- Where the file system has no flock (ENOLCK/EOPNOTSUPP on some network mounts), the record decides: a live pid
  on this host, or any record from another host (whose pids we cannot check), refuses; a dead pid is taken over.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from jojo.checkpoint import last_complete
from jojo.errors import NO_SPACE, JojoError, annotate, ensure_dir

LOCK_FILE = ".jojo.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _command() -> str:
    """How this process was started, as a user would type it."""
    argv = list(sys.argv) or ["python"]
    if os.path.basename(argv[0]) in ("jojo", "cli.py", "__main__.py"):
        argv[0] = "jojo"
    elif argv[0] == "-c":
        argv = ["python", "-c", "..."]
    text = shlex.join(argv)
    return text if len(text) <= 200 else text[:197] + "..."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _read_record(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        record = json.loads(raw.decode("utf-8")) if raw.strip() else None
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _describe(record: dict | None) -> str:
    if not record:
        return "another process (it has not written its name yet)"
    where = f" on host {record.get('host')}" if record.get("host") != socket.gethostname() else ""
    since = f", since {record['started']}" if record.get("started") else ""
    return f"pid {record.get('pid')}{where} ({record.get('command', '?')}{since})"


class RunLock:
    """The lock of one run directory: `acquire()` / `release()`, or `with RunLock(run_dir):`.

    acquire creates the run directory (it must exist to hold the lock file). release is idempotent; when it runs
    while an OSError is propagating (in a `finally`), it names the run directory and its last complete checkpoint
    on that error, so a failure anywhere in the run (a full disk while appending metrics.jsonl) says where."""

    def __init__(self, run_dir: str | Path, say=None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.fd: int | None = None
        self._created = False

    def acquire(self) -> RunLock:
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun: rank 0 writes the run directory, and locks it
            return self
        self._created = not self.run_dir.exists()
        for _ in range(20):
            ensure_dir(self.run_dir)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except FileNotFoundError:  # a run that failed to start removed the folder it had created
                continue
            try:
                if not self._lock(fd):
                    continue  # the file we locked was removed meanwhile: lock the new one
            except BaseException:
                os.close(fd)
                raise
            self.fd = fd
            break
        else:
            raise JojoError(f"could not lock {self.path}: it keeps being replaced; is another jojo starting there?")
        record = _read_record(self.fd)
        if record:
            self.say(f"jojo: taking over the lock of {self.run_dir}: {_describe(record)} ended without releasing it")
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": _command(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        data = (json.dumps(mine) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)
        os.fsync(self.fd)
        return self

    def _lock(self, fd: int) -> bool:
        """flock `fd`; False when the path no longer names the locked inode; JojoError when another holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            record = _read_record(fd)
            if record is None:  # it has just created the file and is writing its record
                time.sleep(0.2)
                record = _read_record(fd)
            raise self._busy(record) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                raise
            self._check_record_without_flock(fd)
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino)

    def _check_record_without_flock(self, fd: int) -> None:
        record = _read_record(fd)
        if not record or record.get("pid") == os.getpid():
            return
        if record.get("host") != socket.gethostname() or _pid_alive(int(record.get("pid", 0))):
            raise JojoError(
                f"{self.run_dir} is in use by {_describe(record)} (this file system has no flock, so Jojo trusts "
                f"the record); wait for it to finish, or delete {self.path} if that run is over"
            )

    def _busy(self, record: dict | None) -> JojoError:
        pid = record.get("pid") if record else None
        stop = f" or stop it (kill {pid})" if pid and record.get("host") == socket.gethostname() else ""
        return JojoError(
            f"{self.run_dir} is in use by {_describe(record)}: one run directory has one writer; wait for that run "
            f"to finish{stop}, or choose another --out"
        )

    def release(self, exc: BaseException | None = None) -> None:
        exc = exc or sys.exc_info()[1]  # in a `finally`, sys.exc_info() is the exception on its way out
        if isinstance(exc, OSError):
            if exc.filename is None:  # the OS did not say which file (a write() that hit a full disk)
                annotate(exc, doing="writing the run", path=self.run_dir)
            if exc.errno in NO_SPACE:
                annotate(exc, after=last_complete(self.run_dir))
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            now = os.stat(self.path)
            mine = os.fstat(fd)
            if (now.st_dev, now.st_ino) == (mine.st_dev, mine.st_ino):
                os.unlink(self.path)  # while still locked: see the module docstring
        except OSError:
            pass  # a read-only or vanished directory: the kernel drops the lock with the descriptor anyway
        finally:
            os.close(fd)
        if self._created:  # a run that wrote nothing (it failed a start-up check) leaves no empty folder
            try:
                self.run_dir.rmdir()
            except OSError:
                pass  # not empty: it holds the run

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.release(exc)


def run_lock(run_dir: str | Path) -> RunLock:
    """`with run_lock(run_dir): ...` holds the run directory's lock for the block."""
    return RunLock(run_dir)


def lock_holder(run_dir: str | Path) -> dict | None:
    """The record of whoever holds (or last held, if it died) the run directory's lock; None when free."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _read_record(fd)
    finally:
        os.close(fd)
