"""One run per output: an advisory lock on a training run's checkpoint and metrics file.

Two runs saving to one checkpoint would each rename its own file over the other's (the last
one wins, the other run is lost), and two runs appending to one metrics file would
interleave their records. A run therefore holds ``fcntl.flock`` on ``<path>.lock`` for its
whole life, with its PID written in the file; a second run is refused with one line naming
that PID. The kernel drops the lock when its holder exits, however it exits (SIGKILL
included), so a lock file a dead run left behind is simply taken over."""

import os
from contextlib import contextmanager
from pathlib import Path

from .errors import AnecyError, OutputError


class OutputBusy(AnecyError):
    """An output another live run holds."""


def lock_path(path) -> Path:
    """stories.ckpt -> stories.ckpt.lock"""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _holder(fd) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "a process that has not written its pid yet"


@contextmanager
def held(path, what: str = "file"):
    """Hold the lock of ``path`` (the ``what`` of a run: "checkpoint", "metrics file")
    until the block ends; OutputBusy (one line naming the holder's PID) when another
    process holds it. Where the filesystem cannot lock (some network mounts), the run goes
    on unlocked, as before."""
    import fcntl
    lock = lock_path(path)
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OutputError(f"cannot lock the {what} {path}: {lock}: "
                              f"{e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputBusy(f"the {what} {path} is in use by another run ({holder}); wait "
                             f"for it to end, or name another {what}") from None
        except OSError:
            os.close(fd)
            fd = None
            break
        # a holder that just ended removed the file this fd opened: lock the one there now
        try:
            st, now = os.fstat(fd), os.stat(lock)
            current = (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino)
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    if fd is None:
        yield
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(lock)   # while still holding it: a waiter then sees a new file
        except OSError:
            pass
        os.close(fd)
