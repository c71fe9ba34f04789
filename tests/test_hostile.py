"""Hostile input against every command, as a table: one line, exit status 2, nothing lost.

Each row of ``CASES`` is a command line, the files it needs (made by small setup helpers),
and words of the one error line it must end with. Every case runs as a user runs it, in a
subprocess with a timeout (a hang fails), and must exit with status 2 and exactly one line
on stderr, no traceback. Then every file of the case's directory and of the shared files it
reads (a checkpoint, a token file and its sidecar, exports, a metrics file, a FIFO standing
in for a device) must be as it was, byte for byte, with nothing added: no output, no
temporary, no lock file. A new command joins the matrix by adding rows.

Placeholders in a command line: ``{w}`` is the directory of shared files (``world``),
``{d}`` the case's own directory (also the working directory), ``{pid}`` this process.
"""
import fcntl
import hashlib
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120
HAS_DEV_FULL = os.path.exists("/dev/full")
HAS_PROC = os.path.isdir("/proc/self")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# -- the shared files ---------------------------------------------------------------------------

def write_byte_tokenizer(path):
    """A llama2.c tokenizer.bin of <unk>, BOS, EOS, the 256 byte pieces and a few words:
    anecy encodes with it in pure Python, so the matrix needs no tokenizer library."""
    words = [b" once", b" upon", b" a", b" time", b" the", b" end", b"e", b"t", b"a"]
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"<0x%02X>" % i for i in range(256)] + words
    out = bytearray(struct.pack("<i", 16))
    for i, p in enumerate(pieces):
        out += struct.pack("<fi", float(-i), len(p)) + p
    Path(path).write_bytes(bytes(out))


def sh(*args, cwd):
    proc = subprocess.run([sys.executable, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shared inputs, made once: a tokenizer, a corpus, its token file and sidecar, a one-step
    tiny checkpoint with its metrics, and that model exported as llama2.c and HF."""
    from anecy.prepare import prepare
    w = tmp_path_factory.mktemp("world")
    write_byte_tokenizer(w / "tok.bin")
    (w / "corpus.txt").write_text("".join(f"once upon a time {i} the end\n\n" for i in range(60)))
    prepare([w / "corpus.txt"], w / "tok.bin", w / "data.bin", workers=1, progress=False,
            log=lambda *_: None)
    sh(ROOT / "train_stories.py", "--preset", "tiny", "--steps", "1", "--data", "data.bin",
       "--ckpt", "run.ckpt", "--metrics", "m.jsonl", "--no-progress", cwd=w)
    sh("-m", "anecy", "export", "--ckpt", "run.ckpt", "--format", "llama2c", "--out",
       "export.bin", cwd=w)
    sh("-m", "anecy", "export", "--ckpt", "run.ckpt", "--format", "hf", "--out", "hf", cwd=w)
    os.mkfifo(w / "fifo")
    return w


# -- setup helpers: each returns a function of the case directory ---------------------------

def put(name, content):
    """A file ``name`` holding ``content`` (str or bytes)."""
    data = content.encode("utf-8", "surrogatepass") if isinstance(content, str) else content

    def make(d, w):
        p = d / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return make


def copy(name, src):
    """A copy of the shared file or directory ``src`` as ``name``."""
    def make(d, w):
        (shutil.copytree if (w / src).is_dir() else shutil.copy)(w / src, d / name)
    return make


def fifo(name):
    return lambda d, w: os.mkfifo(d / name)


def folder(name):
    return lambda d, w: (d / name).mkdir(parents=True)


def loop(name):
    """A symlink loop: name -> name.other -> name."""
    def make(d, w):
        os.symlink(f"{name}.other", d / name)
        os.symlink(name, d / f"{name}.other")
    return make


def link(name, target):
    """A symlink to ``target`` ({w}/{d} placeholders allowed)."""
    return lambda d, w: os.symlink(target.format(w=w, d=d), d / name)


def hardlink(name, src):
    return lambda d, w: os.link(w / src, d / name)


def unix_socket(name):
    def make(d, w):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(d / name))
        s.close()
    return make


class Held:
    """A lock file this process holds open while a case runs."""

    def __init__(self, fd):
        self.fd = fd


def held_lock(name):
    """The run lock of ``name`` held by this process (as another run would hold it); it is
    released after the case."""
    def make(d, w):
        fd = os.open(d / f"{name}.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        return Held(fd)
    return make


def deep(n=100_000):
    return "[" * n + "]" * n


def metrics(**fields):
    """One metrics line with ``fields`` over a valid record."""
    import json
    rec = dict(step=1, loss=2.0, lr=1e-4, ms=5.0, tokens_per_s=100.0, updated=True)
    rec.update(fields)
    return json.dumps(rec) + "\n"


# -- the table ----------------------------------------------------------------------------------

CASES = []


def case(id, argv, expect, *setup, when=True, why=""):
    """A row: ``argv`` starts with a script (train_stories.py, train_qwen.py) or an anecy
    command; ``expect`` is words of the error line."""
    # under CI a missing requirement is a failure, never a skip (tests/conftest.py)
    marks = () if when or IN_CI else (pytest.mark.skip(reason=why),)
    CASES.append(pytest.param(argv, expect, setup, id=id, marks=marks))


DEV_FULL = dict(when=HAS_DEV_FULL, why="no /dev/full here")
PROC = dict(when=HAS_PROC, why="no /proc here")

# prepare: text to a token file
P = ["prepare", "--tokenizer", "{w}/tok.bin", "--no-progress"]
IN = "{w}/corpus.txt"
case("prepare-no-input", ["prepare", "--tokenizer", "{w}/tok.bin", "--out", "o.bin"],
     "the following arguments are required: INPUT")
case("prepare-no-tokenizer", ["prepare", IN, "--out", "o.bin"], "required: --tokenizer")
case("prepare-no-out", ["prepare", IN, "--tokenizer", "{w}/tok.bin"], "required: --out")
case("prepare-bad-flag", P + [IN, "--out", "o.bin", "--bogus"], "unrecognized arguments")
case("prepare-missing-input", P + ["nope.txt", "--out", "o.bin"], "nope.txt: no such file")
case("prepare-input-dir", P + ["sub", "--out", "o.bin"], "is a directory", folder("sub"))
case("prepare-input-loop", P + ["loop.txt", "--out", "o.bin"], "symlink loop", loop("loop.txt"))
case("prepare-input-socket", P + ["s.txt", "--out", "o.bin"], "is a socket",
     unix_socket("s.txt"))
case("prepare-input-under-file", P + ["{w}/corpus.txt/x.txt", "--out", "o.bin"],
     "not a directory")
case("prepare-out-is-input", P + ["c.txt", "--out", "c.txt"], "also an input",
     copy("c.txt", "corpus.txt"))
case("prepare-out-is-input-via-symlink", P + ["c.txt", "--out", "l.txt"], "also an input",
     copy("c.txt", "corpus.txt"), link("l.txt", "c.txt"))
case("prepare-out-is-input-via-hardlink", P + [IN, "--out", "h.txt"], "also an input",
     hardlink("h.txt", "corpus.txt"))
case("prepare-out-is-tokenizer", P + [IN, "--out", "{w}/tok.bin"], "also an input")
case("prepare-sidecar-is-input", P + ["o.bin.json", "--out", "o.bin"], "also an input",
     copy("o.bin.json", "corpus.txt"))
case("prepare-val-out-is-input", P + ["o.val.bin", "--out", "o.bin", "--val-frac", "0.5"],
     "also an input", copy("o.val.bin", "corpus.txt"))
case("prepare-out-dev-full", P + [IN, "--out", "/dev/full"], "character device", **DEV_FULL)
case("prepare-out-dev-null", P + [IN, "--out", "/dev/null"], "character device")
case("prepare-out-symlink-to-dev-full", P + [IN, "--out", "full.bin"], "character device",
     link("full.bin", "/dev/full"), **DEV_FULL)
case("prepare-out-fifo", P + [IN, "--out", "pipe"], "named pipe", fifo("pipe"))
case("prepare-out-socket", P + [IN, "--out", "s.bin"], "socket", unix_socket("s.bin"))
case("prepare-sidecar-fifo", P + [IN, "--out", "o.bin"], "named pipe", fifo("o.bin.json"))
case("prepare-val-out-fifo", P + [IN, "--out", "o.bin", "--val-frac", "0.5"], "named pipe",
     fifo("o.val.bin"))
case("prepare-out-proc", P + [IN, "--out", "/proc/anecy-o.bin"], "cannot write", **PROC)
case("prepare-out-proc-file", P + [IN, "--out", "/proc/self/comm"], "cannot write", **PROC)
case("prepare-out-dir", P + [IN, "--out", "sub"], "it is a directory", folder("sub"))
case("prepare-out-missing-dir", P + [IN, "--out", "nodir/o.bin"], "no directory nodir")
case("prepare-out-under-file", P + [IN, "--out", "f/o.bin"], "f is not a directory",
     put("f", "a file"))
case("prepare-out-loop", P + [IN, "--out", "o.bin"], "symlink loop", loop("o.bin"))
case("prepare-val-frac-high", P + [IN, "--out", "o.bin", "--val-frac", "1.5"], "[0, 1)")
case("prepare-val-frac-nan", P + [IN, "--out", "o.bin", "--val-frac", "nan"], "finite")
case("prepare-val-frac-word", P + [IN, "--out", "o.bin", "--val-frac", "half"], "a number")
case("prepare-val-frac-none-held", P + ["one.txt", "--out", "o.bin", "--val-frac", "0.1"],
     "holds out none", put("one.txt", "only one document\n"))
case("prepare-empty-separator", P + [IN, "--out", "o.bin", "--separator", ""],
     "cannot be empty")
case("prepare-workers-negative", P + [IN, "--out", "o.bin", "--workers", "-1"], "non-negative")
case("prepare-tokenizer-missing", ["prepare", IN, "--tokenizer", "nope.model", "--out",
                                   "o.bin"], "no such tokenizer file")
case("prepare-tokenizer-loop", ["prepare", IN, "--tokenizer", "t.bin", "--out", "o.bin"],
     "symlink loop", loop("t.bin"))
case("prepare-tokenizer-short", ["prepare", IN, "--tokenizer", "t.bin", "--out", "o.bin"],
     "too short", put("t.bin", b"\x01"))
case("prepare-tokenizer-garbage", ["prepare", IN, "--tokenizer", "t.bin", "--out", "o.bin"],
     "not a llama2.c tokenizer", put("t.bin", b"\xff" * 64))
case("prepare-tokenizer-bad-json", ["prepare", IN, "--tokenizer", "t.json", "--out", "o.bin"],
     "not a Hugging Face tokenizer", put("t.json", "{oops"))
case("prepare-tokenizer-empty-dir", ["prepare", IN, "--tokenizer", "tk", "--out", "o.bin"],
     "without tokenizer.json", folder("tk"))
case("prepare-jsonl-lone-surrogate", P + ["s.jsonl", "--out", "o.bin"],
     "s.jsonl:2: not valid UTF-8 text (a lone surrogate U+D800",
     put("s.jsonl", '{"text": "fine"}\n{"text": "a \\ud800 b"}\n'))
case("prepare-jsonl-low-surrogate", P + ["s.jsonl", "--out", "o.bin"], "lone surrogate U+DC80",
     put("s.jsonl", '{"text": "\\udc80"}\n'))
case("prepare-jsonl-deep", P + ["d.jsonl", "--out", "o.bin"], "d.jsonl:1: not a JSON line "
     "(nested more than", put("d.jsonl", '{"text": "x", "n": ' + deep() + "}\n"))
case("prepare-jsonl-deep-objects", P + ["d.jsonl", "--out", "o.bin"], "nested more than",
     put("d.jsonl", '{"a":' * 50_000 + "1" + "}" * 50_000 + "\n"))
case("prepare-jsonl-broken", P + ["b.jsonl", "--out", "o.bin"], "b.jsonl:3: not a JSON line",
     put("b.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": broken}\n'))
case("prepare-jsonl-no-text", P + ["b.jsonl", "--out", "o.bin"], 'b.jsonl:2: a JSON line needs',
     put("b.jsonl", '{"text": "a"}\n{"txt": "b"}\n'))
case("prepare-jsonl-text-number", P + ["b.jsonl", "--out", "o.bin"], "is a int, not a string",
     put("b.jsonl", '{"text": 3}\n'))
case("prepare-jsonl-text-null", P + ["b.jsonl", "--out", "o.bin"], "not a string",
     put("b.jsonl", '{"text": null}\n'))
case("prepare-jsonl-array-line", P + ["b.jsonl", "--out", "o.bin"], 'needs a "text" field',
     put("b.jsonl", '["text"]\n'))
case("prepare-jsonl-huge-number", P + ["b.jsonl", "--out", "o.bin"], "b.jsonl:1: not a JSON",
     put("b.jsonl", '{"text": "a", "n": ' + "9" * 5000 + "}\n"))
case("prepare-jsonl-not-utf8", P + ["b.jsonl", "--out", "o.bin"], "b.jsonl:2: not UTF-8",
     put("b.jsonl", b'{"text": "a"}\n{"text": "caf\xe9"}\n'))
case("prepare-json-array-file", P + ["a.json", "--out", "o.bin"], "not JSON lines",
     put("a.json", '[{"text": "a"}]'))
case("prepare-text-not-utf8", P + ["l.txt", "--out", "o.bin"], "l.txt:3: not UTF-8",
     put("l.txt", b"ok\n\ncaf\xe9\n"))
case("prepare-text-encoded-surrogate", P + ["l.txt", "--out", "o.bin"], "l.txt:1: not UTF-8",
     put("l.txt", b"a \xed\xa0\x80 b\n"))
case("prepare-text-empty", P + ["e.txt", "--out", "o.bin"], "no documents in",
     put("e.txt", "\n \n\n"))
case("prepare-text-only-bom", P + ["e.txt", "--out", "o.bin"], "no documents in",
     put("e.txt", "\ufeff\n"))
case("prepare-jsonl-only-bom", P + ["e.jsonl", "--out", "o.bin"], "no documents in",
     put("e.jsonl", "\ufeff\n"))
case("prepare-second-input-bad", P + [IN, "b.jsonl", "--out", "o.bin"], "b.jsonl:1:",
     put("b.jsonl", "{\n"))

# train: the scripts and `anecy train`
T = ["train_stories.py", "--preset", "tiny", "--steps", "1", "--no-progress"]
TD = T + ["--data", "{w}/data.bin"]
case("train-steps-zero", T + ["--steps", "0"], "positive integer")
case("train-steps-word", T + ["--steps", "ten"], "positive integer")
case("train-steps-float", T + ["--steps", "1.5"], "positive integer")
case("train-lr-nan", T + ["--lr", "nan"], "finite")
case("train-lr-inf", T + ["--lr", "inf"], "finite")
case("train-lr-word", T + ["--lr", "fast"], "a number")
case("train-preset-unknown", T + ["--preset", "gpt5"], "invalid choice")
case("train-qwen-preset-in-stories", T + ["--preset", "qwen3-tiny"], "invalid choice")
case("train-bogus-flag", T + ["--bogus"], "unrecognized arguments")
case("train-clip-negative", TD + ["--clip", "-1"], "clip")
case("train-accum-zero", T + ["--accum", "0"], "positive integer")
case("train-warmup-negative", T + ["--warmup", "-1"], "non-negative")
case("train-seed-negative", T + ["--seed", "-1"], "non-negative")
case("train-ckpt-every-word", T + ["--ckpt-every", "x"], "non-negative")
case("train-eval-every-negative", T + ["--eval-every", "-2"], "non-negative")
case("train-loss-scale-zero", TD + ["--loss-scale", "0"], "positive")
case("train-loss-scale-word", T + ["--loss-scale", "dynamic"], "a number or auto")
case("train-backend-unknown", T + ["--backend", "gpu"], "invalid choice")
case("train-backend-ane", TD + ["--backend", "ane"], "ane backend")
case("train-resume-and-scratch", T + ["--resume", "--scratch"], "contradict")
case("train-resume-and-overwrite", T + ["--resume", "--overwrite"], "--overwrite")
case("train-init-from-and-resume", T + ["--resume", "--init-from", "{w}/export.bin"],
     "cannot be combined")
case("train-resume-nothing", T + ["--resume", "--ckpt", "nowhere.ckpt"], "no checkpoint")
case("train-data-missing", T + ["--data", "missing.bin"], "no such token file")
case("train-data-dir", T + ["--data", "sub"], "is a directory", folder("sub"))
case("train-data-loop", T + ["--data", "l.bin"], "symlink loop", loop("l.bin"))
case("train-data-fifo", T + ["--data", "{w}/fifo"], "named pipe")
case("train-data-dev-null", T + ["--data", "/dev/null"], "character device")
case("train-data-odd", T + ["--data", "odd.bin"], "odd length", put("odd.bin", b"\1\0\2"))
case("train-data-empty", T + ["--data", "e.bin"], "need at least", put("e.bin", b""))
case("train-data-short", T + ["--data", "s.bin"], "need at least",
     put("s.bin", bytes(range(20))))
case("train-data-out-of-vocab", T + ["--data", "v.bin"], "not below",
     put("v.bin", b"\x40\x9c" * 1000))
case("train-data-sidecar-lies", T + ["--data", "d.bin"], "do not belong together",
     copy("d.bin", "data.bin"), put("d.bin.json", '{"format": "anecy-tokens-1", "tokenizer": '
     '{}, "vocab_size": 300, "dtype": "uint16", "tokens": 7}'))
case("train-data-sidecar-corrupt", T + ["--data", "d.bin"], "corrupt token file sidecar",
     copy("d.bin", "data.bin"), put("d.bin.json", "{"))
case("train-data-sidecar-deep", T + ["--data", "d.bin"], "nested more than",
     copy("d.bin", "data.bin"), put("d.bin.json", deep()))
case("train-data-sidecar-not-utf8", T + ["--data", "d.bin"], "not UTF-8",
     copy("d.bin", "data.bin"), put("d.bin.json", b"\xff\xfe{}"))
case("train-data-sidecar-other-format", T + ["--data", "d.bin"], "not an anecy token file",
     copy("d.bin", "data.bin"), put("d.bin.json", '{"format": "x"}'))
case("train-data-sidecar-bad-dtype", T + ["--data", "d.bin"], "unknown dtype",
     copy("d.bin", "data.bin"), put("d.bin.json", '{"format": "anecy-tokens-1", "tokenizer": '
     '{}, "vocab_size": 300, "dtype": "int8", "tokens": 7}'))
case("train-data-sidecar-wrong-type", T + ["--data", "d.bin"], "'tokens' missing or not int",
     copy("d.bin", "data.bin"), put("d.bin.json", '{"format": "anecy-tokens-1", "tokenizer": '
     '{}, "vocab_size": 300, "dtype": "uint16", "tokens": "7"}'))
case("train-data-sidecar-big-vocab", T + ["--data", "d.bin"], "more than the model's",
     copy("d.bin", "data.bin"), put("d.bin.json", '{"format": "anecy-tokens-1", "tokenizer": '
     '{}, "vocab_size": 99999, "dtype": "uint16", "tokens": 7}'))
case("train-data-held-out-missing", T + ["--data", "d.bin"], "held-out file",
     copy("d.bin", "data.bin"), lambda d, w: (d / "d.bin.json").write_text(
         (w / "data.bin.json").read_text().replace('"split": "all"', '"split": "train", '
                                                   '"val": {"path": "gone.bin"}')))
case("train-ckpt-is-data", TD + ["--ckpt", "{w}/data.bin"], "also an input")
case("train-ckpt-is-sidecar", TD + ["--ckpt", "{w}/data.bin.json"], "also an input")
case("train-ckpt-hardlinks-data", TD + ["--ckpt", "h.bin"], "also an input",
     hardlink("h.bin", "data.bin"))
case("train-ckpt-symlinks-data", TD + ["--ckpt", "l.ckpt"], "also an input",
     link("l.ckpt", "{w}/data.bin"))
case("train-ckpt-is-tokenizer", TD + ["--ckpt", "{w}/tok.bin", "--tokenizer", "{w}/tok.bin"],
     "also an input")
case("train-ckpt-is-init-from", TD + ["--ckpt", "e.bin", "--init-from", "e.bin"],
     "also an input", copy("e.bin", "export.bin"))
case("train-ckpt-dev-full", TD + ["--ckpt", "/dev/full"], "character device", **DEV_FULL)
case("train-ckpt-dev-null", TD + ["--ckpt", "/dev/null"], "character device")
case("train-ckpt-fifo", TD + ["--ckpt", "{w}/fifo"], "named pipe")
case("train-ckpt-socket", TD + ["--ckpt", "s.ckpt"], "socket", unix_socket("s.ckpt"))
case("train-ckpt-proc", TD + ["--ckpt", "/proc/run.ckpt"], "cannot write the checkpoint", **PROC)
case("train-ckpt-dir", TD + ["--ckpt", "."], "is a directory")
case("train-ckpt-under-file", TD + ["--ckpt", "f/run.ckpt"], "f is not a directory",
     put("f", "x"))
case("train-ckpt-loop", TD + ["--ckpt", "l.ckpt"], "symlink loop", loop("l.ckpt"))
case("train-ckpt-exists", TD + ["--ckpt", "r.ckpt"], "r.ckpt already exists: resume it with "
     "--resume, or pass --overwrite", copy("r.ckpt", "run.ckpt"))
case("train-ckpt-exists-other-file", TD + ["--ckpt", "r.ckpt"], "already exists",
     put("r.ckpt", "my thesis"))
case("train-ckpt-exists-default-name", TD, "stories.ckpt already exists",
     copy("stories.ckpt", "run.ckpt"))
case("train-qwen-ckpt-exists", ["train_qwen.py", "--preset", "qwen3-tiny", "--steps", "1",
                                "--no-progress", "--data", "{w}/data.bin"],
     "qwen.ckpt already exists", put("qwen.ckpt", "keep"))
case("train-ckpt-locked", TD + ["--ckpt", "r.ckpt"], "in use by another run (pid {pid})",
     held_lock("r.ckpt"))
case("train-ckpt-locked-resume", TD + ["--ckpt", "r.ckpt", "--resume", "--steps", "2"],
     "in use by another run (pid {pid})", copy("r.ckpt", "run.ckpt"), held_lock("r.ckpt"))
case("train-metrics-locked", TD + ["--metrics", "m.jsonl"],
     "metrics file m.jsonl is in use by another run (pid {pid})", put("m.jsonl", ""),
     held_lock("m.jsonl"))
case("train-lock-is-dir", TD + ["--ckpt", "r.ckpt"], "cannot lock", folder("r.ckpt.lock"))
case("train-metrics-fifo", TD + ["--metrics", "{w}/fifo"], "named pipe")
case("train-metrics-dir", TD + ["--metrics", "."], "is a directory")
case("train-metrics-missing-dir", TD + ["--metrics", "nodir/m.jsonl"], "no directory nodir")
case("train-metrics-proc", TD + ["--metrics", "/proc/x"], "cannot write the metrics file",
     **PROC)
case("train-metrics-is-data", TD + ["--metrics", "{w}/data.bin"], "also an input")
case("train-metrics-is-ckpt", TD + ["--ckpt", "r.ckpt", "--overwrite", "--metrics", "r.ckpt"],
     "also an input", put("r.ckpt", "keep"))
case("train-metrics-new-is-ckpt", TD + ["--ckpt", "n.ckpt", "--metrics", "n.ckpt"],
     "is the checkpoint")
case("train-metrics-loop", TD + ["--metrics", "m.jsonl"], "symlink loop", loop("m.jsonl"))
case("train-resume-garbage", T + ["--resume", "--ckpt", "bad.ckpt"], "not an anecy checkpoint",
     put("bad.ckpt", b"garbage" * 100))
case("train-resume-truncated", T + ["--resume", "--ckpt", "t.ckpt"], "checkpoint",
     lambda d, w: (d / "t.ckpt").write_bytes((w / "run.ckpt").read_bytes()[:5000]))
case("train-resume-flipped", TD + ["--resume", "--ckpt", "t.ckpt", "--steps", "2"], "corrupt",
     lambda d, w: (d / "t.ckpt").write_bytes(_flip((w / "run.ckpt").read_bytes(), -100)))
case("train-resume-other-preset", TD + ["--resume", "--ckpt", "r.ckpt", "--preset",
                                        "stories15m"], "another", copy("r.ckpt", "run.ckpt"))
case("train-resume-a-llama2c-file", T + ["--resume", "--ckpt", "{w}/export.bin"],
     "not an anecy checkpoint")
case("train-init-from-missing", TD + ["--init-from", "nope.bin", "--ckpt", "n.ckpt"],
     "no such file")
case("train-init-from-loop", TD + ["--init-from", "l.bin", "--ckpt", "n.ckpt"], "symlink loop",
     loop("l.bin"))
case("train-init-from-garbage", TD + ["--init-from", "g.bin", "--ckpt", "n.ckpt"], "g.bin",
     put("g.bin", b"\x00" * 10))
case("train-init-from-no-config", TD + ["--init-from", "hf", "--ckpt", "n.ckpt"],
     "no config.json", folder("hf"))
case("train-init-from-deep-config", TD + ["--init-from", "hf", "--ckpt", "n.ckpt"],
     "config.json: not valid JSON (nested more than", put("hf/config.json", deep()))
case("train-init-from-other-preset", TD + ["--init-from", "{w}/export.bin", "--preset",
                                           "stories15m", "--ckpt", "n.ckpt"],
     "holds another model")
case("train-tokenizer-missing", TD + ["--tokenizer", "nope.model"], "no such tokenizer file")
case("train-tokenizer-garbage", TD + ["--tokenizer", "t.bin"], "too short", put("t.bin", b"1"))
case("anecy-train-bad-flag", ["train", "--steps", "-3"], "positive integer")
case("anecy-train-ckpt-exists", ["train", "--preset", "tiny", "--steps", "1", "--no-progress",
                                 "--data", "{w}/data.bin", "--ckpt", "{w}/run.ckpt"],
     "already exists")

# sample
S = ["sample", "--ckpt", "{w}/run.ckpt", "--tokenizer", "{w}/tok.bin", "--max-new-tokens", "2"]
case("sample-prompt-not-utf8", S + ["--prompt", b"caf\xe9"],
     "the prompt: not valid UTF-8 text (the byte 0xe9")
case("sample-prompt-encoded-surrogate", S + ["--prompt", b"\xed\xa0\x80"],
     "the prompt: not valid UTF-8")
case("sample-seed-huge", S + ["--seed", "99999999999999999999999"], "a seed below 2^64")
case("sample-seed-2-64", S + ["--seed", str(1 << 64)], "a seed below 2^64")
case("sample-seed-negative", S + ["--seed", "-1"], "non-negative")
case("sample-temperature-negative", S + ["--temperature", "-1"], "temperature")
case("sample-temperature-nan", S + ["--temperature", "nan"], "finite")
case("sample-top-p-zero", S + ["--top-p", "0"], "top_p")
case("sample-top-p-two", S + ["--top-p", "2"], "top_p")
case("sample-top-k-negative", S + ["--top-k", "-1"], "non-negative")
case("sample-max-new-negative", S + ["--max-new-tokens", "-5"], "non-negative")
case("sample-threads-zero", S + ["--threads", "0"], "positive integer")
case("sample-threads-word", S + ["--threads", "two"], "positive integer")
case("sample-dtype-unknown", S + ["--dtype", "q4"], "invalid choice")
case("sample-no-source", ["sample", "--prompt", "x"], "one of the arguments")
case("sample-two-sources", S + ["--init-from", "{w}/export.bin"], "not allowed with")
case("sample-ckpt-missing", ["sample", "--ckpt", "nope.ckpt"], "no such file")
case("sample-ckpt-loop", ["sample", "--ckpt", "l.ckpt"], "symlink loop", loop("l.ckpt"))
case("sample-ckpt-dir", ["sample", "--ckpt", "sub"], "is a directory", folder("sub"))
case("sample-ckpt-garbage", ["sample", "--ckpt", "g.ckpt"], "not an anecy checkpoint",
     put("g.ckpt", b"garbage" * 50))
case("sample-ckpt-llama2c", ["sample", "--ckpt", "{w}/export.bin"], "use --init-from")
case("sample-ckpt-truncated", ["sample", "--ckpt", "t.ckpt", "--tokenizer", "{w}/tok.bin"],
     "t.ckpt", lambda d, w: (d / "t.ckpt").write_bytes((w / "run.ckpt").read_bytes()[:-64]))
case("sample-ckpt-flipped", ["sample", "--ckpt", "t.ckpt", "--tokenizer", "{w}/tok.bin"],
     "corrupt", lambda d, w: (d / "t.ckpt").write_bytes(_flip((w / "run.ckpt").read_bytes(),
                                                              -100)))
case("sample-tokenizer-missing", ["sample", "--ckpt", "{w}/run.ckpt", "--tokenizer", "no.bin"],
     "no such tokenizer file")
case("sample-no-tokenizer-known", ["sample", "--init-from", "{w}/export.bin"],
     "no tokenizer known")
case("sample-prompt-too-long", S + ["--prompt", "x" * 200], "more than the model's context")
case("sample-init-from-deep-config", ["sample", "--init-from", "hf"], "nested more than",
     put("hf/config.json", deep()))
case("sample-init-from-config-array", ["sample", "--init-from", "hf"], "must hold a JSON object",
     put("hf/config.json", "[]"))
case("sample-init-from-bad-safetensors", ["sample", "--init-from", "hf", "--tokenizer",
                                          "{w}/tok.bin"], "not a safetensors file",
     copy("hf", "hf"), put("hf/model.safetensors", b"\x01\x02"))
case("sample-init-from-deep-safetensors", ["sample", "--init-from", "hf", "--tokenizer",
                                           "{w}/tok.bin"], "nested more than", copy("hf", "hf"),
     put("hf/model.safetensors", len(deep(2000)).to_bytes(8, "little") + deep(2000).encode()))

# export
E = ["export", "--ckpt", "{w}/run.ckpt"]
case("export-hf-version", E + ["--format", "hf", "--out", "o", "--version", "1"],
     "does not apply to --format hf")
case("export-version-2", E + ["--format", "llama2c", "--out", "o.bin", "--version", "2"],
     "invalid choice")
case("export-format-unknown", E + ["--format", "onnx", "--out", "o"], "invalid choice")
case("export-no-out", E + ["--format", "hf"], "required: --out")
case("export-no-format", E + ["--out", "o"], "required: --format")
case("export-out-is-ckpt", E + ["--format", "llama2c", "--out", "{w}/run.ckpt"],
     "also an input")
case("export-out-is-init-from", ["export", "--init-from", "{w}/export.bin", "--format",
                                 "llama2c", "--out", "{w}/export.bin"], "also an input")
case("export-hf-onto-its-input", ["export", "--init-from", "{w}/hf", "--format", "hf", "--out",
                                  "{w}/hf"], "also an input")
case("export-out-dev-full", E + ["--format", "llama2c", "--out", "/dev/full"],
     "character device", **DEV_FULL)
case("export-hf-out-dev-full", E + ["--format", "hf", "--out", "/dev/full"],
     "/dev/full is not a directory", **DEV_FULL)
case("export-out-dev-null", E + ["--format", "llama2c", "--out", "/dev/null"],
     "character device")
case("export-out-fifo", E + ["--format", "llama2c", "--out", "{w}/fifo"], "named pipe")
case("export-hf-config-fifo", E + ["--format", "hf", "--out", "o"], "named pipe",
     folder("o"), fifo("o/config.json"))
case("export-out-proc", E + ["--format", "llama2c", "--out", "/proc/o.bin"], "cannot write",
     **PROC)
case("export-hf-out-proc", E + ["--format", "hf", "--out", "/proc/anecy/o"],
     "cannot create directories in /proc", **PROC)
case("export-out-dir", E + ["--format", "llama2c", "--out", "sub"], "is a directory",
     folder("sub"))
case("export-hf-out-file", E + ["--format", "hf", "--out", "f"], "f is not a directory",
     put("f", "keep"))
case("export-out-loop", E + ["--format", "llama2c", "--out", "l.bin"], "symlink loop",
     loop("l.bin"))
case("export-ckpt-missing", ["export", "--ckpt", "no.ckpt", "--format", "hf", "--out", "o"],
     "no such file")
case("export-ckpt-garbage", ["export", "--ckpt", "g.ckpt", "--format", "hf", "--out", "o"],
     "not an anecy checkpoint", put("g.ckpt", b"garbage" * 50))
case("export-ckpt-is-llama2c", ["export", "--ckpt", "{w}/export.bin", "--format", "hf",
                                "--out", "o"], "use --init-from")
case("export-init-no-config", ["export", "--init-from", "hf", "--format", "llama2c", "--out",
                               "o.bin"], "no config.json", folder("hf"))
case("export-init-config-not-json", ["export", "--init-from", "hf", "--format", "llama2c",
                                     "--out", "o.bin"], "not valid JSON",
     put("hf/config.json", "{"))
case("export-init-config-deep", ["export", "--init-from", "hf", "--format", "llama2c", "--out",
                                 "o.bin"], "not valid JSON (nested more than 100 levels deep)",
     put("hf/config.json", '{"a": ' + deep() + "}"))
case("export-init-config-not-utf8", ["export", "--init-from", "hf", "--format", "llama2c",
                                     "--out", "o.bin"], "not UTF-8",
     put("hf/config.json", b"\xff{}"))
case("export-init-config-arch", ["export", "--init-from", "hf", "--format", "llama2c", "--out",
                                 "o.bin"], "unsupported architecture",
     put("hf/config.json", '{"model_type": "gpt2"}'))
case("export-init-config-missing-key", ["export", "--init-from", "hf", "--format", "llama2c",
                                        "--out", "o.bin"], "lacks",
     put("hf/config.json", '{"model_type": "llama"}'))
case("export-init-no-weights", ["export", "--init-from", "hf", "--format", "llama2c", "--out",
                                "o.bin"], "no model.safetensors",
     lambda d, w: (d / "hf").mkdir() or shutil.copy(w / "hf" / "config.json", d / "hf"))
case("export-init-bad-shard-index", ["export", "--init-from", "hf", "--format", "llama2c",
                                     "--out", "o.bin"], "malformed shard index",
     lambda d, w: (d / "hf").mkdir() or shutil.copy(w / "hf" / "config.json", d / "hf"),
     put("hf/model.safetensors.index.json", deep()))
case("export-init-llama2c-short", ["export", "--init-from", "s.bin", "--format", "hf", "--out",
                                   "o"], "s.bin", put("s.bin", b"\x01\x00\x00\x00"))

# plot
case("plot-missing", ["plot", "nope.jsonl"], "no such metrics file")
case("plot-loop", ["plot", "l.jsonl"], "symlink loop", loop("l.jsonl"))
case("plot-dir", ["plot", "sub"], "is a directory", folder("sub"))
case("plot-empty", ["plot", "m.jsonl"], "no metrics records", put("m.jsonl", ""))
case("plot-not-json", ["plot", "m.jsonl"], "m.jsonl:2: not a JSON line",
     put("m.jsonl", metrics() + "{oops\n"))
case("plot-deep", ["plot", "m.jsonl"], "m.jsonl:1: not a JSON line (nested more than",
     put("m.jsonl", deep() + "\n"))
case("plot-not-utf8", ["plot", "m.jsonl"], "not a text file", put("m.jsonl", b"\xff\xfe\n"))
case("plot-not-a-record", ["plot", "m.jsonl"], "not a metrics record", put("m.jsonl", "[1]\n"))
case("plot-missing-field", ["plot", "m.jsonl"], "not a metrics record",
     put("m.jsonl", '{"step": 1, "loss": 2}\n'))
case("plot-loss-string", ["plot", "m.jsonl"], 'm.jsonl:2: "loss" is a string, not a number',
     put("m.jsonl", metrics() + metrics(step=2, loss="abc")))
case("plot-step-fraction", ["plot", "m.jsonl"], '"step" is a fraction, not an integer',
     put("m.jsonl", metrics(step=1.5)))
case("plot-step-bool", ["plot", "m.jsonl"], '"step" is true/false', put("m.jsonl",
                                                                      metrics(step=True)))
case("plot-lr-null", ["plot", "m.jsonl"], '"lr" is null, not a number',
     put("m.jsonl", metrics(lr=None)))
case("plot-ms-list", ["plot", "m.jsonl"], '"ms" is a list', put("m.jsonl", metrics(ms=[1])))
case("plot-tokens-object", ["plot", "m.jsonl"], '"tokens_per_s" is an object',
     put("m.jsonl", metrics(tokens_per_s={})))
case("plot-val-loss-string", ["plot", "m.jsonl"], '"val_loss" is a string, not a number or null',
     put("m.jsonl", metrics(val_loss="low")))
case("plot-grad-norm-bool", ["plot", "m.jsonl"], '"grad_norm" is true/false',
     put("m.jsonl", metrics(grad_norm=False)))
case("plot-out-is-input", ["plot", "m.png", "-o", "m.png"], "also an input",
     put("m.png", metrics()))
case("plot-out-symlink-to-input", ["plot", "{w}/m.jsonl", "-o", "l.png"], "also an input",
     link("l.png", "{w}/m.jsonl"))
case("plot-out-dev-full", ["plot", "{w}/m.jsonl", "-o", "full.png"], "character device",
     link("full.png", "/dev/full"), **DEV_FULL)
case("plot-out-fifo", ["plot", "{w}/m.jsonl", "-o", "p.png"], "named pipe", fifo("p.png"))
case("plot-out-proc", ["plot", "{w}/m.jsonl", "-o", "/proc/p.png"], "cannot write", **PROC)
case("plot-out-dir", ["plot", "{w}/m.jsonl", "-o", "d.png"], "is a directory", folder("d.png"))
case("plot-out-missing-dir", ["plot", "{w}/m.jsonl", "-o", "nodir/p.png"], "no directory")
case("plot-out-format", ["plot", "{w}/m.jsonl", "-o", "p.gif"], "unknown image format")
case("plot-smooth-negative", ["plot", "{w}/m.jsonl", "--smooth", "-1"], "non-negative")
case("plot-no-files", ["plot"], "required: METRICS.jsonl")

# download (every case fails before any network access)
case("download-unknown-dataset", ["download", "wikipedia"], "invalid choice")
case("download-shards-zero", ["download", "tinystories", "--shards", "0"], "positive integer")
case("download-shards-many", ["download", "tinystories", "--shards", "9999", "--dir", "x"],
     "--shards must be between 1 and")
case("download-workers-negative", ["download", "tinystories", "--workers", "-1"],
     "non-negative")
case("download-dir-is-file", ["download", "tinystories", "--dir", "f"], "cannot create",
     put("f", "keep"))
case("download-dir-dev-full", ["download", "tinystories", "--dir", "/dev/full"],
     "cannot create", **DEV_FULL)
case("download-output-fifo", ["download", "tinystories", "--dir", "dl"], "named pipe",
     folder("dl"), fifo("dl/tinystories_data00.bin"))
case("download-output-dir", ["download", "tinystories", "--dir", "dl"], "is a directory",
     folder("dl/tinystories_val.bin"))

# selftest and the dispatcher
case("selftest-preset-unknown", ["selftest", "--preset", "huge"], "invalid choice")
case("selftest-seed-negative", ["selftest", "--seed", "-1"], "non-negative")
case("anecy-unknown-command", ["fly"], "invalid choice")
case("anecy-bad-global-flag", ["--bogus"], "unrecognized arguments")


def _flip(data: bytes, at: int) -> bytes:
    b = bytearray(data)
    b[at] ^= 0xFF
    return bytes(b)


# -- the runner ---------------------------------------------------------------------------------

def _snapshot(*roots):
    """Every entry under ``roots``: its kind and, for files, a hash of the bytes; for
    symlinks, the target."""
    seen = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                st = os.lstat(p)
                if stat.S_ISREG(st.st_mode):
                    with open(p, "rb") as f:
                        what = hashlib.sha256(f.read()).hexdigest()
                elif stat.S_ISLNK(st.st_mode):
                    what = "-> " + os.readlink(p)
                else:
                    what = stat.S_IFMT(st.st_mode)
                seen[p] = what
    return seen


def _command(argv, d, w):
    def fill(a):
        return a if isinstance(a, bytes) else a.format(w=w, d=d, pid=os.getpid())
    argv = [fill(a) for a in argv]
    if argv[0] in ("train_stories.py", "train_qwen.py"):
        return [sys.executable, str(ROOT / argv[0]), *argv[1:]]
    return [sys.executable, "-m", "anecy", *argv]


def _devices(cmd):
    """The special files a command names, with their kind: they must stay what they are."""
    return {a: os.stat(a).st_mode for a in cmd if isinstance(a, str) and a.startswith("/dev/")
            and os.path.exists(a)}


@pytest.mark.parametrize("argv, expect, setup", CASES)
def test_hostile_input_is_one_line_status_2_and_loses_nothing(world, tmp_path, argv, expect,
                                                              setup):
    d = tmp_path / "case"
    d.mkdir()
    held = [h for make in setup if isinstance(h := make(d, world), Held)]
    cmd = _command(argv, d, world)
    before, devices = _snapshot(d, world), _devices(cmd)
    env = {k: v for k, v in os.environ.items() if k != "ANECY_DATA"}
    try:
        proc = subprocess.run(cmd, cwd=d, capture_output=True, timeout=TIMEOUT, env=env)
    finally:
        for h in held:
            os.close(h.fd)
    err = proc.stderr.decode("utf-8", "replace")
    lines = err.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}: {err}"
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "error" in lines[0], lines[0]
    assert expect.format(pid=os.getpid()) in lines[0], lines[0]
    assert _snapshot(d, world) == before, "files changed, appeared or went"
    assert _devices(cmd) == devices


def test_the_matrix_is_broad():
    assert len(CASES) >= 150
    commands = {c.values[0][0] for c in CASES}
    assert {"prepare", "train_stories.py", "train_qwen.py", "train", "sample", "export", "plot",
            "download", "selftest"} <= commands


# -- what the locks and the reading path allow ---------------------------------------------------

def test_a_lock_left_by_a_dead_run_is_taken_over(world, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "r.ckpt.lock").write_text(f"{dead.pid}\n")
    (tmp_path / "m.jsonl.lock").write_text(f"{dead.pid}\n")
    cmd = _command(TD + ["--ckpt", "r.ckpt", "--metrics", "m.jsonl"], tmp_path, world)
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r.ckpt").is_file() and (tmp_path / "m.jsonl").read_text()
    assert not list(tmp_path.glob("*.lock"))       # released at the end


def test_overwrite_starts_over_and_resume_continues(world, tmp_path):
    shutil.copy(world / "run.ckpt", tmp_path / "r.ckpt")
    (tmp_path / "other.ckpt").write_text("not a checkpoint, but the user's")
    run = _command(TD + ["--steps", "2"], tmp_path, world)
    assert subprocess.run(run + ["--ckpt", "r.ckpt", "--resume"], cwd=tmp_path,
                          capture_output=True, timeout=600).returncode == 0
    over = subprocess.run(run + ["--ckpt", "other.ckpt", "--overwrite"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert over.returncode == 0, over.stderr
    from anecy.checkpoint import read_checkpoint_meta
    assert read_checkpoint_meta(tmp_path / "other.ckpt")["meta"]["step"] == 2


@pytest.mark.skipif(not IS_ROOT and not IN_CI, reason="renaming over a device needs root")
@pytest.mark.skipif(not HAS_DEV_FULL and not IN_CI, reason="no /dev/full here")
def test_atomic_write_never_renames_over_a_device(tmp_path):
    # the check at the rename itself, for a device that appears after the output was vetted
    from anecy.errors import OutputError
    from anecy.fileio import atomic_write
    dev = tmp_path / "full"
    st = os.stat("/dev/full")
    os.mknod(dev, st.st_mode, st.st_rdev)
    with pytest.raises(OutputError, match="character device, not a regular file"):
        with atomic_write(dev, fsync=False) as f:
            f.write(b"data")
    assert stat.S_ISCHR(os.stat(dev).st_mode) and os.listdir(tmp_path) == ["full"]


# -- the bounded JSON parser every reader uses ---------------------------------------------------

def test_json_nesting_is_bounded_and_strings_do_not_count():
    import json

    from anecy import jsonio
    for n in (0, 1, 2, 57, 100):
        value = [1]
        for _ in range(n - 1):
            value = [value]
        text = json.dumps(value if n else 1)
        assert jsonio.depth(text) == n and jsonio.loads(text) == (value if n else 1)
    for text in ("[" * 101 + "]" * 101, '{"a":' * 101 + "1" + "}" * 101, deep()):
        with pytest.raises(jsonio.JSONError, match="nested more than 100 levels deep"):
            jsonio.loads(text)
    # brackets inside strings, escaped quotes included, are text
    text = json.dumps({"text": "[" * 5000 + '\\"{' * 300, "n": [[1]]})
    assert jsonio.depth(text) == 3 and jsonio.loads(text)["n"] == [[1]]
    assert jsonio.loads(b'{"a": "\xc3\xa9"}') == {"a": "\u00e9"}
    for bad, words in ((b"\xff{}", "not UTF-8"), ("{", "Expecting"), ("9" * 5000, "digits")):
        with pytest.raises(jsonio.JSONError, match=words):
            jsonio.loads(bad)
