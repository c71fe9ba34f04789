"""Text to a token file: what ``anecy prepare`` does.

Input is plain text (documents separated by blank lines, or by a separator string such as
TinyStories' ``<|endoftext|>``) or JSONL with a ``"text"`` field per line (mlx-lm's data
convention). Each document is stripped and encoded as llama2.c's pretokenizer does: BOS,
then its ids, no EOS. A tokenizer without BOS (Qwen3's) ends each document with EOS
instead, so documents stay separated.

The output is the flat little-endian token file the trainer reads (uint16 when the
vocabulary fits, else uint32) and a JSON sidecar beside it (``<out>.json``) naming the
tokenizer, vocabulary, dtype and counts. With ``val_frac``, every document whose turn it is
(evenly spread: document i is held out when floor((i + 1) f) > floor(i f)) goes to a
separate held-out file ``<stem>.val<suffix>``, with its own sidecar. The documents are
encoded in chunks by a pool of worker processes; the output order is the input order, so
the result does not depend on the number of workers.
"""

import errno
import json
import os
import signal
import stat
import sys
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np

from . import jsonio
from . import tokenizer as tokenizers
from .data import SIDECAR_FORMAT, sidecar_path, token_dtype
from .errors import AnecyError, cannot_read
from .fileio import atomic_write, check_writable, file_kind, missing
from .tokenizer import check_text

# documents per task handed to a worker: big enough to amortise the pickling
CHUNK_DOCS = 256
# inputs below this many bytes are encoded in the calling process unless workers are asked for
SMALL_INPUT = 1 << 20
JSONL_SUFFIXES = (".jsonl", ".ndjson")
BOM = "\ufeff"   # a UTF-8 byte-order mark, which some editors put first: not text


# -- reading documents ---------------------------------------------------------------------------

def _lines(path: Path, f):
    """(line number, line, bytes) of the UTF-8 text in the open binary file ``f``, with a
    one-line error naming the line of a bad byte. A leading byte-order mark is dropped."""
    lineno = 0
    try:
        for lineno, raw in enumerate(f, 1):
            line = raw.decode("utf-8").replace("\r\n", "\n")
            if lineno == 1 and line.startswith(BOM):
                line = line[1:]
            yield lineno, line, len(raw)
    except UnicodeDecodeError as e:
        raise AnecyError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte "
                         f"{e.start} of the line)") from None
    except OSError as e:
        raise cannot_read(path, e) from None


def _is_jsonl_line(line: str) -> bool:
    """Whether the first non-blank line of a file says JSONL: a JSON object with "text"."""
    try:
        obj = jsonio.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and "text" in obj


def jsonl_documents(path: Path, lines):
    """(text, bytes read) of each of the ``lines`` of a JSONL file; blank lines are
    skipped."""
    for lineno, line, size in lines:
        if not line.strip():
            continue
        try:
            obj = jsonio.loads(line)
        except ValueError as e:
            raise AnecyError(f"{path}:{lineno}: not a JSON line ({e})") from None
        if not isinstance(obj, dict) or "text" not in obj:
            raise AnecyError(f"{path}:{lineno}: a JSON line needs a \"text\" field")
        if not isinstance(obj["text"], str):
            raise AnecyError(f"{path}:{lineno}: \"text\" is a {type(obj['text']).__name__}, "
                             "not a string")
        check_text(obj["text"], f"{path}:{lineno}")
        yield obj["text"], size


def text_documents(lines, separator=None):
    """(text, bytes read) of each document of the ``lines`` of a plain text file: runs of
    lines between blank lines, or, with ``separator``, the text between occurrences of it."""
    lines_, size = [], 0
    for _, line, read in lines:
        size += read
        if separator is None:
            if line.strip():
                lines_.append(line)
                continue
            parts = [""]
        else:
            parts = line.split(separator)
            if len(parts) == 1:
                lines_.append(line)
                continue
        lines_.append(parts[0])
        yield "".join(lines_), size
        for middle in parts[1:-1]:
            yield middle, 0
        lines_, size = [parts[-1]], 0
    if lines_:
        yield "".join(lines_), size


def _file_documents(path: Path, f, separator):
    """The documents of one open input, read in a single pass (so a pipe works): the
    first non-blank line decides JSONL (by the extension, else by its content) or text."""
    lines = _lines(path, f)
    head = []
    for item in lines:
        head.append(item)
        if item[1].strip():
            break
    first = head[-1][1] if head else ""
    lines = chain(head, lines)
    if path.suffix.lower() in JSONL_SUFFIXES or (first.strip() and _is_jsonl_line(first)):
        return jsonl_documents(path, lines)
    if path.suffix.lower() == ".json":
        raise AnecyError(f"{path}: a .json file that is not JSON lines; anecy reads JSONL, "
                         'one {"text": ...} object per line')
    return text_documents(lines, separator)


def _open_input(path: Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise AnecyError(f"{path}: {missing(path)}") from None
    except IsADirectoryError:
        raise AnecyError(f"{path}: is a directory, not a text or JSONL file") from None
    except OSError as e:
        what = missing(path) if e.errno == errno.ELOOP else (e.strerror or e)
        raise AnecyError(f"{path}: cannot read ({what})") from None


def documents(paths, separator=None):
    """(stripped text, bytes read) of every non-empty document of the inputs, in order.
    Each input is opened once and read once, front to back."""
    for path in map(Path, paths):
        with _open_input(path) as f:
            pending = 0   # bytes of skipped empty documents, reported with the next one
            for text, size in _file_documents(path, f, separator):
                text = text.strip()
                pending += size
                if text:
                    yield text, pending
                    pending = 0
            if pending:
                yield "", pending


# -- encoding in worker processes ----------------------------------------------------------------

_worker_state = {}


def _init_worker(tokenizer_path, separator, dtype, worker=False):
    if worker:   # Ctrl-C is the parent's to handle: it stops the pool and removes the output
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker_state["tok"] = tokenizers.load(tokenizer_path)
    _worker_state["sep"] = separator
    _worker_state["dtype"] = np.dtype(dtype)


def _encode_chunk(texts):
    """The token arrays of a list of documents, each framed by the separator token."""
    tok, sep, dtype = _worker_state["tok"], _worker_state["sep"], _worker_state["dtype"]
    return [np.asarray(tok.encode(t, bos=sep == "bos", eos=sep == "eos"), dtype=dtype)
            for t in texts]


# -- the command's work --------------------------------------------------------------------------

@dataclass
class Split:
    """One output file and what went into it."""
    path: Path
    documents: int = 0
    tokens: int = 0
    file: object = field(default=None, repr=False)


def val_path_for(out: Path) -> Path:
    """tokens.bin -> tokens.val.bin"""
    return out.with_name(f"{out.stem}.val{out.suffix}")


def _check_inputs(paths):
    """Every input is there and can be read as a stream, found without opening it (an open
    would consume a pipe): regular files, named pipes and character devices such as
    /dev/stdin or process substitution's /dev/fd/N."""
    if not paths:
        raise AnecyError("no input files")
    for p in map(Path, paths):
        try:
            mode = os.stat(p).st_mode
        except OSError:
            raise AnecyError(f"{p}: {missing(p)}") from None
        if stat.S_ISDIR(mode):
            raise AnecyError(f"{p}: is a directory, not a text or JSONL file")
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            raise AnecyError(f"{p}: is {file_kind(mode)}, not a text or JSONL file")
        if not os.access(p, os.R_OK):
            raise AnecyError(f"{p}: cannot read (permission denied)")


def _input_bytes(paths) -> int:
    """Bytes in the inputs that are regular files (a pipe's length is not known)."""
    total = 0
    for p in paths:
        st = os.stat(p)
        total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def worker_count(requested, total_bytes: int) -> int:
    """The processes to encode with: ``requested``, or (None) one per core, but one for
    an input under ``SMALL_INPUT`` bytes, where starting a worker costs more than the
    encoding; never more than the cores, which would only add start-up time and memory
    (1000 workers took a minute on a corpus one process encodes in a second)."""
    cores = available_cores()
    if requested is None:
        return 1 if total_bytes < SMALL_INPUT else cores
    return max(1, min(requested, cores))


def _separator_of(tok):
    if tok.bos_id is not None:
        return "bos"
    if tok.eos_id is not None:
        return "eos"
    return "none"


def _chunks(docs, n):
    """Lists of up to ``n`` document texts, each with the input bytes read for it."""
    texts, size = [], 0
    for text, read in docs:
        size += read
        if text:
            texts.append(text)
        if len(texts) == n:
            yield texts, size
            texts, size = [], 0
    if texts or size:
        yield texts, size


class _Done:
    """A result already at hand, with the interface of multiprocessing's AsyncResult."""

    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


def prepare(inputs, tokenizer, out, val_frac=0.0, separator=None, workers=None,
            progress=True, log=print) -> dict:
    """Tokenize ``inputs`` into ``out`` (and its held-out file with ``val_frac``); returns
    the sidecar written beside ``out``. ``tokenizer`` is a path; ``workers`` None means one
    process per core (one for an input under ``SMALL_INPUT`` bytes)."""
    from tqdm import tqdm

    out = Path(out)
    if not 0.0 <= val_frac < 1.0:
        raise AnecyError(f"--val-frac must be in [0, 1), got {val_frac}")
    if separator == "":
        raise AnecyError("the document separator cannot be empty")
    _check_inputs(inputs)
    outputs = [out] + ([val_path_for(out)] if val_frac else [])
    sources = list(inputs) + [tokenizer]
    for p in outputs:
        check_writable(p, what="token file", inputs=sources)
        check_writable(sidecar_path(p), what="sidecar", inputs=sources)
    tok = tokenizers.load(tokenizer)
    dtype = token_dtype(tok.vocab_size)
    sep = _separator_of(tok)
    if sep == "none":
        log(f"note: tokenizer {tok.path} has neither BOS nor EOS; documents are written "
            "back to back with nothing between them")
    total_bytes = _input_bytes(inputs)
    workers = worker_count(workers, total_bytes)
    train, val = Split(out), Split(val_path_for(out))
    n_docs = 0

    def write(arrays):
        nonlocal n_docs
        for ids in arrays:
            held_out = val_frac and int((n_docs + 1) * val_frac) > int(n_docs * val_frac)
            split = val if held_out else train
            split.file.write(ids.tobytes())
            split.documents += 1
            split.tokens += len(ids)
            n_docs += 1

    with ExitStack() as stack:
        if workers > 1:
            import multiprocessing as mp
            # fork where it is safe (no threads yet: the progress bar comes after), spawn on
            # macOS, where forking a process that has loaded system frameworks is not
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            pool = mp.get_context(method).Pool(workers, initializer=_init_worker,
                                               initargs=(tok.path, sep, dtype.str, True))
            stack.callback(pool.join)
            stack.callback(pool.terminate)
        else:
            pool = None
            _init_worker(tok.path, sep, dtype.str)

        def submit(texts):
            if pool is None:
                return _Done(_encode_chunk(texts))
            return pool.apply_async(_encode_chunk, (texts,))

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress,
                   desc="prepare", dynamic_ncols=True)
        stack.push(lambda *exc: _close_bar(bar, failed=exc[0] is not None))
        train.file = stack.enter_context(atomic_write(train.path))
        if val_frac:
            val.file = stack.enter_context(atomic_write(val.path))
        # chunks are read here, encoded by the pool and written back in input order, with a
        # bounded number in flight so that a large input is never held in memory
        in_flight = deque()
        for texts, size in _chunks(documents(inputs, separator), CHUNK_DOCS):
            in_flight.append((submit(texts), size))
            if len(in_flight) >= 2 * workers:
                result, size = in_flight.popleft()
                write(result.get())
                bar.update(size)
        while in_flight:
            result, size = in_flight.popleft()
            write(result.get())
            bar.update(size)
        if not n_docs:
            raise AnecyError("no documents in " + ", ".join(map(str, inputs)) +
                             " (empty input)")
        if val_frac and not val.documents:
            raise AnecyError(f"--val-frac {val_frac} holds out none of the {n_docs} "
                             "documents; give more text or a larger fraction")

    meta = {
        "format": SIDECAR_FORMAT,
        "tokenizer": {"kind": tok.kind, "path": str(Path(tok.path).resolve())},
        "vocab_size": tok.vocab_size, "dtype": dtype.name,
        "bos_id": tok.bos_id, "eos_id": tok.eos_id, "separator": sep,
        "sources": [str(Path(p).resolve()) for p in inputs],
    }
    train_meta = dict(meta, split="train" if val_frac else "all",
                      documents=train.documents, tokens=train.tokens)
    if val_frac:
        train_meta["val"] = {"path": val.path.name, "fraction": val_frac,
                             "documents": val.documents, "tokens": val.tokens}
        val_meta = dict(meta, split="val", train=train.path.name,
                        documents=val.documents, tokens=val.tokens)
        write_sidecar(val.path, val_meta)
    write_sidecar(train.path, train_meta)
    for s in (train, val) if val_frac else (train,):
        log(f"{s.path}: {s.tokens:,} tokens ({dtype.name}) in {s.documents:,} documents")
    return train_meta


def _close_bar(bar, failed):
    if failed:   # the error line is what matters then, not a half-drawn bar
        bar.leave = False
    bar.close()


def write_sidecar(token_path, meta: dict) -> None:
    with atomic_write(sidecar_path(token_path)) as f:
        f.write((json.dumps(meta, indent=2) + "\n").encode("utf-8"))
