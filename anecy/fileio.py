"""Writing files so that a crash never leaves a half-written one.

Every file anecy writes for a user (checkpoints, exported models, token files) goes through
``atomic_write``: the bytes go to a temporary file beside the target, which is flushed,
fsync'ed and renamed over the target, so the target is either the old file or the complete
new one. The temporary is named ``<name>.tmp-<pid>``: ``temp_path`` is the one place that
knows the pattern."""

import os
from contextlib import contextmanager
from pathlib import Path


def temp_path(path) -> Path:
    """The temporary that ``atomic_write(path)`` writes before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def fsync_dir(directory) -> None:
    """Make a rename in ``directory`` durable. Some filesystems cannot open or fsync a
    directory; the file is already in place then, so this is skipped quietly."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path, *, fsync: bool = True):
    """Open ``path``'s temporary for binary writing; on a normal exit, flush, fsync and rename
    it over ``path``. On any exception (disk full, Ctrl-C, a bug) the temporary is removed and
    ``path`` is untouched. ``fsync=False`` keeps the atomicity but not durability across a
    power cut (tests, scratch files)."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if fsync:
        fsync_dir(path.parent if str(path.parent) else ".")
