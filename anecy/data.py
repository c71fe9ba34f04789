"""Training data: pretokenized token files, deterministic window sampling and vocabulary
compaction.

Token files are llama2.c's pretokenized TinyStories format: flat little-endian uint16 ids.
"""

import os
from pathlib import Path

import numpy as np

from .errors import DataError

DEFAULT_DATA = "tinystories_data00.bin"
# Scans go chunk by chunk so that a multi-gigabyte file is never loaded whole.
_CHUNK = 1 << 22


def _chunks(tokens):
    for start in range(0, len(tokens), _CHUNK):
        yield start, np.asarray(tokens[start:start + _CHUNK])


def _check_ids(tokens, vocab_size, where):
    if np.asarray(tokens[:0]).dtype.kind not in "iu":  # 3.7 must not be read as token 3
        raise DataError(f"{where}: token ids must be integers, got {tokens.dtype}")
    for start, chunk in _chunks(tokens):
        if chunk.size and chunk.min() < 0:
            i = int(np.argmax(chunk < 0))
            raise DataError(f"{where}: token id {chunk[i]} at position {start + i} is negative")
        if chunk.max() >= vocab_size:
            i = int(np.argmax(chunk >= vocab_size))
            raise DataError(f"{where}: token id {chunk[i]} at position {start + i} is not below "
                            f"vocab_size {vocab_size}")


def token_dtype(vocab_size) -> np.dtype:
    """Token files hold uint16 ids (llama2.c's format) when the vocabulary fits in 16 bits,
    else uint32 (Qwen3's 151936 tokens)."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def open_tokens(path, vocab_size, seq_len) -> np.ndarray:
    """Map a token file read-only, after checking that it can train a model with
    ``vocab_size`` tokens on windows of ``seq_len + 1`` tokens."""
    dtype = token_dtype(vocab_size)
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a token file")
    try:
        with open(path, "rb"):
            size = os.path.getsize(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such token file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read token file ({e.strerror or e})") from None
    if size % dtype.itemsize:
        what = "odd length" if dtype.itemsize == 2 else "length not a multiple of 4"
        raise DataError(f"{path}: {what} of {size} bytes, not a file of "
                        f"uint{8 * dtype.itemsize} token ids")
    n = size // dtype.itemsize
    if n < seq_len + 1:
        raise DataError(f"{path}: {n} tokens, need at least seq_len + 1 = {seq_len + 1}")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    _check_ids(tokens, vocab_size, path)
    return tokens


def default_data_path() -> Path:
    """``$ANECY_DATA`` if set, else tinystories_data00.bin in the working directory."""
    return Path(os.environ.get("ANECY_DATA") or DEFAULT_DATA)


class TokenSampler:
    """Training windows drawn uniformly from the head of a token array; the tail
    (``val_fraction`` of it, at least one window) is held out for validation."""

    def __init__(self, tokens, seq_len, seed, val_fraction=0.02):
        if not 0 <= val_fraction <= 0.5:
            raise ValueError(f"val_fraction must be in [0, 0.5], got {val_fraction}")
        self.tokens = tokens
        self.seq_len = int(seq_len)
        window = self.seq_len + 1
        n = len(tokens)
        if n < 2 * window:
            raise DataError(f"{n} tokens are too few to train on windows of seq_len {seq_len} "
                            f"and hold out a validation part: need at least {2 * window}")
        self.n_train = n - max(window, int(n * val_fraction))
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.drawn = 0

    def _window(self, start):
        chunk = np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int32)
        return chunk[:-1], chunk[1:]

    def next_train(self):
        """The next training window ``(x, y)``, int32, ``y`` being ``x`` shifted by one."""
        start = int(self.rng.integers(0, self.n_train - self.seq_len))
        self.drawn += 1
        return self._window(start)

    def val_batches(self, n):
        """``n`` windows ``(x, y)`` evenly spaced over the held-out tail, the same every call."""
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
    def from_tokens(cls, tokens, vocab_size):
        """The ids occurring anywhere in ``tokens``."""
        _check_ids(tokens, vocab_size, "token data")
        used = np.zeros(vocab_size, dtype=bool)
        for _, chunk in _chunks(tokens):
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
