"""Training data: pretokenized token files, deterministic window sampling and vocabulary
compaction.

Token files are llama2.c's pretokenized TinyStories format: flat little-endian ids, uint16
when the vocabulary fits in 16 bits, else uint32. ``anecy prepare`` writes a JSON sidecar
beside each one (``tokens.bin.json``) naming its tokenizer, vocabulary size and dtype; when
it is there, the dtype comes from it, and a file tokenized for a larger vocabulary than the
model's is refused. Files without a sidecar (llama2.c's own) take the dtype from the model's
vocabulary size.
"""

import os
import stat
from pathlib import Path

import numpy as np

from . import corpus, jsonio
from .errors import DataError, cannot_read

DEFAULT_DATA = "tinystories_data00.bin"
SIDECAR_FORMAT = "anecy-tokens-1"
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Scans go chunk by chunk so that a multi-gigabyte file is never loaded whole.
_CHUNK = 1 << 22


def _chunks(tokens):
    for start in range(0, len(tokens), _CHUNK):
        yield start, np.asarray(tokens[start:start + _CHUNK])


def first_bad_id(ids, vocab_size):
    """(position, id) of the first id outside [0, vocab_size) in ``ids`` (an array, a token
    file's memmap, a list), or None when there is none."""
    for start, chunk in _chunks(ids):
        if not chunk.size or (chunk.min() >= 0 and chunk.max() < vocab_size):
            continue
        i = int(np.argmax((chunk < 0) | (chunk >= vocab_size)))
        return start + i, chunk[i]
    return None


def check_ids(tokens, vocab_size, where):
    """DataError naming ``where`` unless ``tokens`` are integer ids below ``vocab_size``."""
    dtype = np.asarray(tokens[:0]).dtype
    if dtype.kind not in "iu":  # 3.7 must not be read as token 3
        raise DataError(f"{where}: token ids must be integers, got {dtype}")
    bad = first_bad_id(tokens, vocab_size)
    if bad is not None:
        i, value = bad
        why = "is negative" if value < 0 else f"is not below vocab_size {vocab_size}"
        raise DataError(f"{where}: token id {value} at position {i} {why}")


def token_dtype(vocab_size) -> np.dtype:
    """Token files hold uint16 ids (llama2.c's format) when the vocabulary fits in 16 bits,
    else uint32 (Qwen3's 151936 tokens)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def sidecar_path(path) -> Path:
    """tokens.bin -> tokens.bin.json"""
    path = Path(path)
    return path.with_name(path.name + ".json")


def read_sidecar(path) -> "dict | None":
    """The sidecar ``anecy prepare`` wrote beside the token file ``path``, or None when there
    is none. Its keys: format, tokenizer {kind, path}, vocab_size, dtype (uint16 | uint32),
    bos_id, eos_id, separator (bos | eos | none), documents, tokens, split (all | train |
    val), sources; ``val`` {path, fraction, documents, tokens} on a training file with a
    held-out file (path relative to the token file's directory), ``train`` on that file."""
    side = sidecar_path(path)
    try:
        text = side.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise cannot_read(side, e, "token file sidecar", DataError) from None
    try:
        meta = jsonio.loads(text)
    except ValueError as e:
        raise DataError(f"{side}: corrupt token file sidecar ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise DataError(f"{side}: not an anecy token file sidecar (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    for key, kind in (("vocab_size", int), ("dtype", str), ("tokens", int),
                      ("tokenizer", dict)):
        if not isinstance(meta.get(key), kind):
            raise DataError(f"{side}: corrupt token file sidecar ({key!r} missing or not "
                            f"{kind.__name__})")
    if meta["dtype"] not in _DTYPES:
        raise DataError(f"{side}: unknown dtype {meta['dtype']!r} (uint16 or uint32)")
    return meta


def open_tokens(path, vocab_size, seq_len) -> np.ndarray:
    """Map a token file read-only, after checking that it can train a model with
    ``vocab_size`` tokens on windows of ``seq_len + 1`` tokens."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a token file")
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = None   # said below, by the open
    if mode is not None and not stat.S_ISREG(mode):   # a FIFO would hang the open
        from .fileio import file_kind
        raise DataError(f"{path}: is {file_kind(mode)}, not a token file (training maps "
                        "the file; a regular file is needed)")
    try:
        with open(path, "rb"):
            size = os.path.getsize(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such token file") from None
    except OSError as e:
        raise cannot_read(path, e, "token file", DataError) from None
    meta = read_sidecar(path)
    if meta is None:
        dtype = token_dtype(vocab_size)
    else:
        dtype = _DTYPES[meta["dtype"]]
        if meta["vocab_size"] > vocab_size:
            tok = meta["tokenizer"]
            raise DataError(f"{path}: tokenized for {meta['vocab_size']} tokens "
                            f"({tok.get('kind')} tokenizer {tok.get('path')}), more than the "
                            f"model's vocabulary of {vocab_size}")
        if meta["tokens"] * dtype.itemsize != size:
            raise DataError(f"{path}: {size} bytes, but its sidecar says {meta['tokens']} "
                            f"{meta['dtype']} tokens; the file and {sidecar_path(path).name} "
                            "do not belong together (prepare it again)")
    if size % dtype.itemsize:
        what = "odd length" if dtype.itemsize == 2 else "length not a multiple of 4"
        raise DataError(f"{path}: {what} of {size} bytes, not a file of "
                        f"uint{8 * dtype.itemsize} token ids")
    n = size // dtype.itemsize
    if n < seq_len + 1:
        raise DataError(f"{path}: {n} tokens, need at least seq_len + 1 = {seq_len + 1}")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    check_ids(tokens, vocab_size, path)
    return tokens


def held_out_path(path) -> "Path | None":
    """The held-out file ``anecy prepare --val-frac`` wrote for the token file ``path``, as
    its sidecar names it, or None."""
    meta = read_sidecar(path)
    if not meta or not isinstance(meta.get("val"), dict) or "path" not in meta["val"]:
        return None
    return Path(path).parent / meta["val"]["path"]


def open_held_out(path, vocab_size, seq_len) -> "np.ndarray | None":
    """The held-out tokens of the token file ``path`` (see ``held_out_path``), checked as
    ``open_tokens`` checks them, or None when it has none."""
    val = held_out_path(path)
    if val is None:
        return None
    if not val.exists():
        raise DataError(f"{path}: its held-out file {val} is missing (the sidecar names it; "
                        "prepare the data again, or delete the sidecar to train without it)")
    return open_tokens(val, vocab_size, seq_len)


def default_data_path() -> Path:
    """``$ANECY_DATA`` if set, else tinystories_data00.bin in the working directory."""
    return Path(os.environ.get("ANECY_DATA") or DEFAULT_DATA)


def load_training_data(cfg, data_path=None, tokens=None, log=print):
    """(tokens, their name, held-out tokens or None) for training ``cfg``: the given token
    array, else the named file, else the default TinyStories file, else the built-in corpus
    (logging a notice that says how to get TinyStories). A token file's held-out part is the
    file `anecy prepare --val-frac` wrote beside it."""
    if tokens is not None:
        tokens = np.asarray(tokens)
        check_ids(tokens, cfg.vocab_size, "given tokens")
        return tokens, "given tokens", None
    path = Path(data_path) if data_path is not None else default_data_path()
    if data_path is None and not path.exists():
        if cfg.vocab_size < 32000:
            raise DataError(f"no token file at {path}, and the {corpus.NAME} needs the Llama-2 "
                            f"vocabulary (32000 tokens; this model has {cfg.vocab_size})")
        log(corpus.BUILTIN_NOTICE)
        return corpus.builtin_tokens(), corpus.NAME, None
    tokens = open_tokens(path, cfg.vocab_size, cfg.seq_len)
    held_out = open_held_out(path, cfg.vocab_size, cfg.seq_len)
    if held_out is not None:
        log(f"held-out data: {held_out.filename}")
    return tokens, str(data_path if data_path is not None else path), held_out


class TokenSampler:
    """Training windows drawn uniformly from the head of a token array; the tail
    (``val_fraction`` of it, at least one window) is held out for validation. Given
    ``val_tokens`` (the held-out file of ``anecy prepare --val-frac``), training draws from
    all of ``tokens`` and validation reads ``val_tokens``."""

    def __init__(self, tokens, seq_len, seed, val_fraction=0.02, val_tokens=None):
        if not 0 <= val_fraction <= 0.5:
            raise ValueError(f"val_fraction must be in [0, 0.5], got {val_fraction}")
        self.tokens = tokens
        self.seq_len = int(seq_len)
        window = self.seq_len + 1
        n = len(tokens)
        if val_tokens is not None:
            if n < window + 1 or len(val_tokens) < window:
                raise DataError(f"{n} training and {len(val_tokens)} held-out tokens are too "
                                f"few for windows of seq_len {seq_len}: need at least "
                                f"{window + 1} and {window}")
            self.n_train = n
        elif n < 2 * window:
            raise DataError(f"{n} tokens are too few to train on windows of seq_len {seq_len} "
                            f"and hold out a validation part: need at least {2 * window}")
        else:
            self.n_train = n - max(window, int(n * val_fraction))
        self.val_tokens = val_tokens
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.drawn = 0

    def _window(self, start, tokens=None):
        tokens = self.tokens if tokens is None else tokens
        chunk = np.asarray(tokens[start:start + self.seq_len + 1], dtype=np.int32)
        return chunk[:-1], chunk[1:]

    def next_train(self):
        """The next training window ``(x, y)``, int32, ``y`` being ``x`` shifted by one."""
        start = int(self.rng.integers(0, self.n_train - self.seq_len))
        self.drawn += 1
        return self._window(start)

    def val_batches(self, n):
        """``n`` windows ``(x, y)`` evenly spaced over the held-out tokens, the same every
        call."""
        if self.val_tokens is not None:
            last = len(self.val_tokens) - self.seq_len - 1
            starts = np.linspace(0, last, n).round().astype(np.int64)
            return [self._window(int(s), self.val_tokens) for s in starts]
        last = len(self.tokens) - self.seq_len - 1
        starts = np.linspace(self.n_train, last, n).round().astype(np.int64)
        return [self._window(int(s)) for s in starts]

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state, "drawn": self.drawn,
                "n_train": self.n_train, "seq_len": self.seq_len}

    def load_state_dict(self, d):
        # The same generator state only gives the same windows on the same split of the data.
        if (d["n_train"], d["seq_len"]) != (self.n_train, self.seq_len):
            raise DataError(f"sampler state is for {d['n_train']} training tokens and seq_len "
                            f"{d['seq_len']}, this data has {self.n_train} and {self.seq_len}")
        self.rng.bit_generator.state = d["bit_generator"]
        self.drawn = d["drawn"]


class VocabMap:
    """The token ids a data set uses, numbered densely: a model over the ``n_active`` ids
    in use trains and runs like the full-vocabulary model, only smaller."""

    def __init__(self, active_ids, vocab_size):
        self.vocab_size = int(vocab_size)
        self.active_ids = np.unique(np.asarray(active_ids, dtype=np.int64)).astype(np.int32)
        if len(self.active_ids) and not (0 <= self.active_ids[0]
                                         and self.active_ids[-1] < self.vocab_size):
            raise DataError(f"active token ids must be in [0, {self.vocab_size})")
        self.n_active = len(self.active_ids)
        self.to_compact = np.full(self.vocab_size, -1, dtype=np.int32)
        self.to_compact[self.active_ids] = np.arange(self.n_active, dtype=np.int32)
        self.is_identity = self.n_active == self.vocab_size

    @classmethod
    def from_tokens(cls, tokens, vocab_size, *more):
        """The ids occurring anywhere in ``tokens`` (or in the ``more`` arrays, e.g. the
        held-out tokens)."""
        used = np.zeros(vocab_size, dtype=bool)
        for array in (tokens, *more):
            check_ids(array, vocab_size, "token data")
            for _, chunk in _chunks(array):
                used |= np.bincount(chunk, minlength=vocab_size) > 0
        return cls(np.flatnonzero(used), vocab_size)

    @classmethod
    def full(cls, vocab_size):
        return cls(np.arange(vocab_size), vocab_size)

    def compact(self, ids) -> np.ndarray:
        """Full-vocabulary ids to compact ids (int32)."""
        ids = np.asarray(ids)
        out = self.to_compact[np.clip(ids, 0, self.vocab_size - 1)]
        bad = (out < 0) | (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            raise DataError(f"token id {ids.flat[np.argmax(bad)]} is not in the active "
                            f"vocabulary ({self.n_active} of {self.vocab_size} ids)")
        return out

    def expand(self, compact_ids) -> np.ndarray:
        """Compact ids back to full-vocabulary ids (int32)."""
        return self.active_ids[np.asarray(compact_ids)]

    def describe(self) -> str:
        if self.is_identity:
            return f"vocab: {self.vocab_size} tokens, no compaction"
        return f"vocab compaction: {self.vocab_size} -> {self.n_active} active tokens"
