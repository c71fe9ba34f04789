"""Writing files so that a crash never leaves a half-written one.

Every file anecy writes for a user (checkpoints, exported models, token files) goes through
``atomic_write``: the bytes go to a temporary file beside the target, which is flushed,
fsync'ed and renamed over the target, so the target is either the old file or the complete
new one. The temporary is named ``<name>.tmp-<pid>``: ``temp_path`` is the one place that
knows the pattern, and ``remove_leftovers`` removes the temporaries a killed writer left.
``check_writable`` lets a command find out, before any long work, that it could not write
its output."""

import os
from contextlib import contextmanager
from pathlib import Path


def temp_path(path) -> Path:
    """The temporary that ``atomic_write(path)`` writes before renaming it to ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def temp_leftovers(path) -> list:
    """Temporaries of ``path`` that earlier writers left (``<name>.tmp-<pid>``), by name."""
    path = Path(path)
    prefix = path.name + ".tmp-"
    try:
        entries = list((path.parent if str(path.parent) else Path(".")).iterdir())
    except OSError:
        return []
    return sorted((p for p in entries
                   if p.name.startswith(prefix) and p.name[len(prefix):].isdigit()),
                  key=lambda p: p.name)


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


class StagedWrite:
    """A write to ``path``'s temporary whose rename is left to the caller.

    ``with staged as f: ...`` writes the temporary (flushed and, with ``fsync``, fsync'ed
    when the block ends; removed if the block raises); ``commit()`` then renames it over
    ``path`` and ``discard()`` removes it. Until the commit ``path`` is untouched, so a
    writer can hold a complete new file back until it knows it wants it."""

    def __init__(self, path, *, fsync: bool = True):
        self.path = Path(path)
        self.tmp = temp_path(self.path)
        self.fsync = fsync
        self.file = None

    def __enter__(self):
        self.file = open(self.tmp, "wb")
        return self.file

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.file.flush()
                if self.fsync:
                    os.fsync(self.file.fileno())
        except BaseException:
            self.file.close()
            self.discard()
            raise
        self.file.close()
        if exc_type is not None:
            self.discard()
        return False

    def commit(self) -> Path:
        """Rename the complete temporary over ``path`` (and make the rename durable)."""
        try:
            os.replace(self.tmp, self.path)
        except BaseException:
            self.discard()
            raise
        self.tmp = None
        if self.fsync:
            fsync_dir(self.path.parent if str(self.path.parent) else ".")
        return self.path

    def discard(self) -> None:
        """Remove the temporary; ``path`` stays as it was."""
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except OSError:
                pass
            self.tmp = None


@contextmanager
def atomic_write(path, *, fsync: bool = True):
    """Open ``path``'s temporary for binary writing; on a normal exit, flush, fsync and rename
    it over ``path``. On any exception (disk full, Ctrl-C, a bug) the temporary is removed and
    ``path`` is untouched. ``fsync=False`` keeps the atomicity but not durability across a
    power cut (tests, scratch files)."""
    staged = StagedWrite(path, fsync=fsync)
    with staged as f:
        yield f
    staged.commit()


@contextmanager
def atomic_path(path, *, fsync: bool = True):
    """``atomic_write`` for writers that open their output by name (a library's writer):
    yields the temporary's path; on a normal exit the file written there is fsync'ed and
    renamed over ``path``, on any exception it is removed and ``path`` is untouched."""
    staged = StagedWrite(path, fsync=fsync)
    try:
        yield staged.tmp
        if fsync:
            with open(staged.tmp, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        staged.discard()
        raise
    staged.commit()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists but belongs to someone else
        return True
    return True


def remove_leftovers(path) -> list:
    """Remove the temporaries of ``path`` that writers killed in the middle of a write left
    behind (``<name>.tmp-<pid>`` of a process that no longer runs); return their paths.
    Nothing else is touched: only that name and that pattern, never a live writer's file."""
    removed = []
    for p in temp_leftovers(path):
        pid = int(p.name.rsplit(".tmp-", 1)[1])
        if p.is_symlink() or not p.is_file() or _pid_alive(pid):
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            continue
        except OSError:
            continue  # not ours to remove (permissions): it stays, as before
        removed.append(p)
    return removed


def check_writable(path, *, what: str = "output", append: bool = False,
                   make_parents: bool = False) -> None:
    """Raise OutputError (one line naming ``path``) unless ``path`` can be written: by
    ``atomic_write`` (a temporary beside it, renamed over it), or, with ``append``, opened
    for appending. With ``make_parents`` a missing directory is fine when it could be made.
    The test is a real one (a probe file created and removed, or the file opened for
    appending and closed), so permissions, read-only filesystems and paths such as /proc
    are judged by the system itself."""
    from .errors import OutputError
    path = Path(path)

    def fail(why):
        raise OutputError(f"cannot write the {what} {path}: {why}")

    if path.is_dir():
        fail("it is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        if parent.exists() or not make_parents:
            fail(f"{parent} is not a directory" if parent.exists() else f"no directory {parent}")
        ancestor = parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            fail(f"{ancestor} is not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            fail(f"no permission to create directories in {ancestor}")
        return
    try:
        if append:
            with open(path, "ab"):
                pass
        else:
            fd = os.open(temp_path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(temp_path(path))
    except OSError as e:
        fail(e.strerror or str(e))
