"""fileio: the atomic writer, its staged form, leftover removal and writability checks."""
import os
import subprocess
import sys

import pytest

from anecy.errors import OutputError
from anecy.fileio import (
    StagedWrite,
    atomic_path,
    atomic_write,
    check_writable,
    remove_leftovers,
    temp_leftovers,
    temp_path,
)


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_atomic_path_renames_what_a_writer_wrote_by_name(tmp_path):
    target = tmp_path / "out.gguf"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            assert tmp == temp_path(target)
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and not temp_leftovers(target)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:   # the writer opens it itself
            f.write(b"new")
        assert target.read_bytes() == b"old"
    assert target.read_bytes() == b"new" and not temp_leftovers(target)


def test_staged_write_commits_or_discards(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    staged = StagedWrite(target, fsync=False)
    with staged as f:
        f.write(b"new")
    assert target.read_bytes() == b"old" and temp_path(target).read_bytes() == b"new"
    staged.discard()
    assert target.read_bytes() == b"old" and not temp_path(target).exists()
    staged = StagedWrite(target, fsync=False)
    with staged as f:
        f.write(b"new")
    staged.commit()
    assert target.read_bytes() == b"new" and not temp_leftovers(target)
    with pytest.raises(RuntimeError):
        with StagedWrite(target) as f:
            f.write(b"half")
            raise RuntimeError
    assert target.read_bytes() == b"new" and not temp_leftovers(target)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(KeyboardInterrupt):
        with atomic_write(target) as f:
            f.write(b"x")
            raise KeyboardInterrupt
    assert not target.exists() and not list(tmp_path.iterdir())


def test_remove_leftovers_takes_only_dead_writers_temporaries_of_that_file(tmp_path):
    dead = dead_pid()
    target = tmp_path / "run.ckpt"
    target.write_bytes(b"checkpoint")
    mine = tmp_path / f"run.ckpt.tmp-{dead}"
    mine.write_bytes(b"leftover")
    kept = [tmp_path / f"run.ckpt.tmp-{os.getpid()}",     # a live writer (this process)
            tmp_path / f"other.ckpt.tmp-{dead}",          # another file's
            tmp_path / f"xrun.ckpt.tmp-{dead}",
            tmp_path / "run.ckpt.tmp-",
            tmp_path / f"run.ckpt.tmp-{dead}x"]
    for p in kept:
        p.write_bytes(b"keep")
    (tmp_path / f"run.ckpt.tmp-{dead + 1}").mkdir()       # not a file: never removed
    assert remove_leftovers(target) == [mine]
    assert not mine.exists() and target.read_bytes() == b"checkpoint"
    assert all(p.read_bytes() == b"keep" for p in kept)
    assert (tmp_path / f"run.ckpt.tmp-{dead + 1}").is_dir()
    assert remove_leftovers(tmp_path / "missing-dir" / "run.ckpt") == []


def test_check_writable(tmp_path):
    check_writable(tmp_path / "new.ckpt")
    check_writable(tmp_path / "a" / "b" / "new.ckpt", make_parents=True)
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())  # no trace left
    (tmp_path / "log.jsonl").write_text("kept\n")
    check_writable(tmp_path / "log.jsonl", append=True)
    assert (tmp_path / "log.jsonl").read_text() == "kept\n"
    (tmp_path / "file").write_text("x")
    for path, kw, words in [(tmp_path, {}, "is a directory"),
                            (tmp_path / "nodir" / "x", {}, "no directory"),
                            (tmp_path / "file" / "x", {"make_parents": True},
                             "is not a directory"),
                            ("/proc/anecy-test", {"append": True}, "cannot write the output"),
                            ("/proc/anecy-test", {}, "cannot write the output")]:
        with pytest.raises(OutputError, match=words):
            check_writable(path, **kw)


def test_check_writable_refuses_inputs_special_files_and_loops(tmp_path):
    (tmp_path / "corpus.txt").write_text("the user's text")
    os.symlink("corpus.txt", tmp_path / "link.txt")
    os.link(tmp_path / "corpus.txt", tmp_path / "hard.txt")
    os.mkfifo(tmp_path / "pipe")
    os.symlink("loop", tmp_path / "loop")
    inputs = [tmp_path / "corpus.txt"]
    for path, kw, words in [
            (tmp_path / "corpus.txt", {"inputs": inputs}, "it is also an input$"),
            (tmp_path / "link.txt", {"inputs": inputs}, "also an input .*corpus.txt"),
            (tmp_path / "hard.txt", {"inputs": inputs}, "also an input"),
            (tmp_path / "pipe", {}, "it is a named pipe, not a regular file"),
            (tmp_path / "pipe", {"append": True}, "named pipe"),
            (tmp_path / "loop", {}, "it is a symlink loop"),
            ("/dev/null", {}, "it is a character device, not a regular file")]:
        with pytest.raises(OutputError, match=words):
            check_writable(path, **kw)
    check_writable(tmp_path / "other.txt", inputs=inputs)   # a new file is no input
    check_writable("/dev/null", append=True)                 # appending replaces nothing
    assert os.stat(tmp_path / "pipe").st_mode & 0o170000 == 0o010000
    assert (tmp_path / "corpus.txt").read_text() == "the user's text"
    # no probe is left, and a new append target is not created by the check
    check_writable(tmp_path / "new.jsonl", append=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corpus.txt", "hard.txt", "link.txt", "loop", "pipe"]


def test_a_staged_write_never_renames_over_a_fifo(tmp_path):
    # a FIFO that appears between the check and the rename stays a FIFO
    target = tmp_path / "out.bin"
    staged = StagedWrite(target, fsync=False)
    with staged as f:
        f.write(b"new")
    os.mkfifo(target)
    with pytest.raises(OutputError, match="named pipe, not a regular file"):
        staged.commit()
    assert os.listdir(tmp_path) == ["out.bin"] and not os.path.isfile(target)


def test_a_planted_temporary_does_not_hang_the_writer(tmp_path):
    os.mkfifo(temp_path(tmp_path / "out.bin"))
    with atomic_write(tmp_path / "out.bin", fsync=False) as f:
        f.write(b"data")
    assert (tmp_path / "out.bin").read_bytes() == b"data"
    assert os.listdir(tmp_path) == ["out.bin"]
