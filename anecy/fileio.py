"""Writing files so that a crash never leaves a half-written one.

Every file anecy writes for a user (checkpoints, exported models, token files) goes through
``atomic_write``: the bytes go to a temporary file beside the target, which is flushed,
fsync'ed and renamed over the target, so the target is either the old file or the complete
new one. The temporary is named ``<name>.tmp-<pid>``: ``temp_path`` is the one place that
knows the pattern, and ``remove_leftovers`` removes the temporaries a killed writer left.
``check_writable`` lets a command find out, before any long work, that it could not write
its output, and of every other way the output could go wrong (see there)."""

import errno
import os
import stat
import tempfile
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
        # the temporary's name is this process's: anything already there (a leftover of an
        # earlier writer with our pid, or a FIFO planted to make us hang) is replaced
        try:
            os.unlink(self.tmp)
        except OSError:
            pass
        self.file = os.fdopen(os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666),
                              "wb")
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
        """Rename the complete temporary over ``path`` (and make the rename durable). A
        ``path`` that is a device, a FIFO or a socket (it may have appeared since the output
        was checked) is never replaced: OutputError. (A directory there makes the rename
        itself fail.)"""
        from .errors import OutputError
        try:
            st = os.lstat(self.path)
        except OSError:
            st = None
        if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)
                                   or stat.S_ISDIR(st.st_mode)):
            self.discard()
            raise OutputError(f"cannot write {self.path}: it is {file_kind(st.st_mode)}, "
                              "not a regular file")
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


def file_kind(mode: int) -> str:
    """What a file of ``mode`` (``os.stat``'s st_mode) is, in words: "a regular file", ..."""
    for test, name in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a special file"


def missing(path) -> str:
    """Why ``path``, which cannot be opened, is not there, in a few words: "no such file",
    "a symlink loop", "a path through a file, not a directory"."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symlink loop"
        if e.errno == errno.ENOTDIR:
            return "a path through a file, not a directory"
        if e.errno == errno.ENOENT:
            return "no such file"
        return e.strerror or str(e)
    return "no such file"


def same_file(a, b) -> bool:
    """Whether the paths ``a`` and ``b`` name one file (symlinks followed, hard links
    seen through); False when either does not exist."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_writable(path, *, what: str = "output", append: bool = False,
                   make_parents: bool = False, inputs=()) -> None:
    """Raise OutputError (one line naming ``path``) unless ``path`` can be written: by
    ``atomic_write`` (a temporary beside it, renamed over it), or, with ``append``, opened
    for appending. With ``make_parents`` a missing directory is fine when it could be made.

    This is the one place that vets an output before any work. Refused: an output that is
    the same file as one of ``inputs`` (a corpus must not be overwritten with its own
    tokens); one that exists and is not a regular file (a directory, a device, a FIFO, a
    socket; for ``append``, character devices such as /dev/null are fine, since appending
    replaces nothing); a symlink loop; and a directory that cannot take the file. The last
    test is a real one (a probe file created and removed, or the file opened for appending
    and closed), so permissions, read-only filesystems and paths such as /proc are judged
    by the system itself."""
    from .errors import OutputError
    path = Path(path)

    def fail(why):
        raise OutputError(f"cannot write the {what} {path}: {why}")

    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            fail("it is a symlink loop")
        st = None   # not there (or under a file: said below, about the directory)
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            fail("it is a directory")
        if not stat.S_ISREG(st.st_mode) and not (append and stat.S_ISCHR(st.st_mode)):
            fail(f"it is {file_kind(st.st_mode)}, not a regular file")
        for source in inputs:
            if source is not None and same_file(path, source):
                fail("it is also an input" + (f" ({source})" if str(source) != str(path)
                                               else ""))
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        if parent.exists() or not make_parents:
            fail(f"{parent} is not a directory" if parent.exists() else f"no directory {parent}")
        ancestor = parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            fail(f"{ancestor} is not a directory")
        try:   # a real test, as below: root passes os.access on /proc, then cannot mkdir
            os.rmdir(tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=ancestor))
        except OSError as e:
            fail(f"cannot create directories in {ancestor} ({e.strerror or e})")
        return
    try:
        if append and st is not None:   # (a new file is probed below: none is left)
            with open(path, "ab"):
                pass
        else:
            fd = os.open(temp_path(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            os.unlink(temp_path(path))
    except OSError as e:
        fail(e.strerror or str(e))
