"""Training data: pretokenized token files, deterministic window sampling and vocabulary
compaction.

Token files are llama2.c's pretokenized TinyStories format: flat little-endian ids, uint16
when the vocabulary fits in 16 bits, else uint32. ``anecy prepare`` writes a JSON sidecar
beside each one (``tokens.bin.json``) naming its tokenizer, vocabulary size and dtype; when
it is there, the dtype comes from it, and a file tokenized for a larger vocabulary than the
model's is refused. Files without a sidecar (llama2.c's own) take the dtype from the model's
vocabulary size.

Examples files (``anecy prepare --format ...``, sidecar format ``anecy-tokens-2``) hold whole
training examples, each token with a flag saying whether the loss scores it: the ids file
is the same flat array (every example's ids back to back), and two files beside it say
where each example starts (``<file>.examples``: little-endian uint64 offsets, one per
example and a last one equal to the token count) and which tokens are scored
(``<file>.mask``: one bit per token, token i in bit i % 8 of byte i // 8). An example's
first token is never scored: nothing before it predicts it. ``read_examples`` reads them.
"""

import os
import stat
from pathlib import Path

import numpy as np

from . import corpus, jsonio
from .errors import DataError, cannot_read

DEFAULT_DATA = "tinystories_data00.bin"
SIDECAR_FORMAT = "anecy-tokens-1"     # a token stream
EXAMPLES_FORMAT = "anecy-tokens-2"    # examples with loss masks (module docstring)
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
# Scans go chunk by chunk so that a multi-gigabyte file is never loaded whole.
_CHUNK = 1 << 22
_MASK_CHUNK = 1 << 18   # bytes of a packed mask: 2M tokens' flags


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


def offsets_path(path) -> Path:
    """tokens.bin -> tokens.bin.examples: where each example of an examples file starts"""
    path = Path(path)
    return path.with_name(path.name + ".examples")


def mask_path(path) -> Path:
    """tokens.bin -> tokens.bin.mask: the loss mask of an examples file, one bit a token"""
    path = Path(path)
    return path.with_name(path.name + ".mask")


def read_sidecar(path) -> "dict | None":
    """The sidecar ``anecy prepare`` wrote beside the token file ``path``, or None when there
    is none. Its keys: format, tokenizer {kind, path}, vocab_size, dtype (uint16 | uint32),
    bos_id, eos_id, separator (bos | eos | none), documents, tokens, split (all | train |
    val), sources; ``val`` {path, fraction, documents, tokens} on a training file with a
    held-out file (path relative to the token file's directory), ``train`` on that file.
    An examples file's sidecar (format EXAMPLES_FORMAT) has examples and scored_tokens in
    place of documents and separator, and seq_len, max_example_tokens, mask_prompt,
    chat_template and what prepare truncated and dropped (docs/chat.md)."""
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
    if not isinstance(meta, dict) or meta.get("format") not in (SIDECAR_FORMAT, EXAMPLES_FORMAT):
        raise DataError(f"{side}: not an anecy token file sidecar (format "
                        f"{meta.get('format') if isinstance(meta, dict) else None!r})")
    required = [("vocab_size", int), ("dtype", str), ("tokens", int), ("tokenizer", dict)]
    if meta["format"] == EXAMPLES_FORMAT:
        required += [("examples", int), ("scored_tokens", int), ("seq_len", int)]
    for key, kind in required:
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
        if meta["format"] == EXAMPLES_FORMAT:
            raise DataError(f"{path}: holds examples with loss masks (anecy prepare --format), "
                            "not a token stream (open_examples reads it)")
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


class Examples:
    """The examples of an examples file (``open_examples``), checked: ``len(ex)`` of them,
    ``ex[k]`` the ``(ids, loss_mask)`` of the k-th (int32 ids, bool mask), ``lengths``
    their token counts. ``tokens`` maps the ids file, ``offsets`` the starts (one more than
    there are examples) and ``mask_bits`` the packed mask (see the module docstring)."""

    def __init__(self, path, tokens, offsets, mask_bits, meta):
        self.path, self.tokens, self.offsets = Path(path), tokens, offsets
        self.mask_bits, self.meta = mask_bits, meta

    def __len__(self):
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, k):
        if not -len(self) <= k < len(self):
            raise IndexError(f"example {k} of {len(self)}")
        k %= len(self)
        start, end = int(self.offsets[k]), int(self.offsets[k + 1])
        return (np.asarray(self.tokens[start:end], dtype=np.int32),
                unpack_mask(self.mask_bits, start, end))

    def __iter__(self):
        for k in range(len(self)):
            yield self[k]


def unpack_mask(mask_bits, start, end) -> np.ndarray:
    """The flags of tokens start..end-1 (bool) from a packed mask (one bit per token, token
    i in bit i % 8 of byte i // 8)."""
    first, last = start // 8, (end + 7) // 8
    bits = np.unpackbits(np.asarray(mask_bits[first:last]), bitorder="little")
    return bits[start - 8 * first:end - 8 * first].astype(bool)


def _file_size(path, what):
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not {what}")
    try:
        with open(path, "rb"):
            return os.path.getsize(path)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file ({what})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def open_examples(path, vocab_size=None) -> Examples:
    """The examples file ``path`` (written by ``anecy prepare --format``), checked against
    its sidecar: sizes, offsets, ids below the sidecar's vocabulary (and below
    ``vocab_size``, a model's, when given), and masks that score at least one token of every
    example and never an example's first token."""
    path = Path(path)
    size = _file_size(path, "a token file")
    meta = read_sidecar(path)
    if meta is None or meta["format"] != EXAMPLES_FORMAT:
        raise DataError(f"{path}: not an examples file (its sidecar {sidecar_path(path).name} "
                        f"{'is missing' if meta is None else 'is of a token stream'}); "
                        "anecy prepare --format writes them")
    if vocab_size is not None and meta["vocab_size"] > vocab_size:
        tok = meta["tokenizer"]
        raise DataError(f"{path}: tokenized for {meta['vocab_size']} tokens "
                        f"({tok.get('kind')} tokenizer {tok.get('path')}), more than the "
                        f"model's vocabulary of {vocab_size}")
    dtype, n_tokens, n_examples = _DTYPES[meta["dtype"]], meta["tokens"], meta["examples"]
    offsets_file, mask_file = offsets_path(path), mask_path(path)

    def lying(why):
        return DataError(f"{path}: {why}; the files do not belong together (prepare it again)")

    if size != n_tokens * dtype.itemsize:
        raise lying(f"{size} bytes, but its sidecar says {n_tokens} {meta['dtype']} tokens")
    size = _file_size(offsets_file, "the example offsets")
    if n_examples < 1 or size != 8 * (n_examples + 1):
        raise lying(f"{offsets_file.name} has {size} bytes, the sidecar says {n_examples} "
                    f"examples ({8 * (n_examples + 1)} bytes of uint64 offsets)")
    size = _file_size(mask_file, "the loss mask")
    if size != (n_tokens + 7) // 8:
        raise lying(f"{mask_file.name} has {size} bytes, {n_tokens} tokens need "
                    f"{(n_tokens + 7) // 8}")
    offsets = np.fromfile(offsets_file, dtype="<u8").astype(np.int64)
    lengths = np.diff(offsets)
    if offsets[0] != 0 or offsets[-1] != n_tokens or (lengths < 2).any():
        bad = int(np.argmax(lengths < 2)) if (lengths < 2).any() else None
        raise lying(f"{offsets_file.name} does not cut {n_tokens} tokens into examples of 2 "
                    "tokens or more" + (f" (example {bad})" if bad is not None else ""))
    if int(lengths.max()) > meta["seq_len"]:
        raise lying(f"example {int(np.argmax(lengths))} has {int(lengths.max())} tokens, more "
                    f"than the sidecar's seq_len {meta['seq_len']}")
    tokens = np.memmap(path, dtype=dtype, mode="r")
    check_ids(tokens, meta["vocab_size"], path)
    mask_bits = np.memmap(mask_file, dtype=np.uint8, mode="r")
    # scored tokens before each offset, counted chunk by chunk
    before = np.zeros(n_examples + 1, np.int64)
    scored = 0
    for start in range(0, len(mask_bits), _MASK_CHUNK):
        bits = np.unpackbits(np.asarray(mask_bits[start:start + _MASK_CHUNK]),
                             bitorder="little")
        first = 8 * start
        if first + bits.size > n_tokens and bits[n_tokens - first:].any():
            raise lying(f"{mask_file.name} flags tokens past the last of {n_tokens}")
        cum = np.concatenate([[0], np.cumsum(bits, dtype=np.int64)]) + scored
        inside = (offsets >= first) & (offsets < first + bits.size)
        before[inside] = cum[offsets[inside] - first]
        heads = offsets[:-1][(offsets[:-1] >= first) & (offsets[:-1] < first + bits.size)]
        if bits[heads - first].any():
            k = int(np.searchsorted(offsets, heads[np.argmax(bits[heads - first])]))
            raise lying(f"{mask_file.name} scores the first token of example {k}")
        scored = int(cum[-1])
    before[offsets == n_tokens] = scored
    if scored != meta["scored_tokens"]:
        raise lying(f"{mask_file.name} scores {scored} tokens, the sidecar says "
                    f"{meta['scored_tokens']}")
    per_example = np.diff(before)
    if (per_example < 1).any():
        raise lying(f"example {int(np.argmax(per_example < 1))} has no scored token")
    return Examples(path, tokens, offsets, mask_bits, meta)


def read_examples(path, vocab_size=None):
    """The ``(ids, loss_mask)`` numpy arrays (int32 ids, bool flags: True where the loss
    scores the token) of each example of the examples file ``path``, in order, after
    ``open_examples``' checks."""
    return iter(open_examples(path, vocab_size))


def default_data_path() -> Path:
    """``$ANECY_DATA`` if set, else tinystories_data00.bin in the working directory."""
    return Path(os.environ.get("ANECY_DATA") or DEFAULT_DATA)


def is_examples_file(path) -> bool:
    """Whether ``path``'s sidecar says it holds examples (``anecy prepare --format``)."""
    meta = read_sidecar(path) if Path(path).is_file() else None
    return meta is not None and meta["format"] == EXAMPLES_FORMAT


def load_training_data(cfg, data_path=None, tokens=None, log=print):
    """(tokens, their name, held-out tokens or None) for training ``cfg``: the given token
    array, else the named file, else the default TinyStories file, else the built-in corpus
    (logging a notice that says how to get TinyStories). A token file's held-out part is the
    file `anecy prepare --val-frac` wrote beside it. An examples file gives Examples in
    place of the token arrays."""
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
    if is_examples_file(path):
        examples = open_examples(path, cfg.vocab_size)
        val = held_out_path(path)
        if val is not None and not val.exists():
            raise DataError(f"{path}: its held-out file {val} is missing (the sidecar names "
                            "it; prepare the data again)")
        held_out = None if val is None else open_examples(val, cfg.vocab_size)
        if held_out is not None:
            log(f"held-out examples: {val}")
        return examples, str(path), held_out
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

    def skip(self, n):
        """Draw the next ``n`` windows' starts without reading them (the other ranks' of a
        data-parallel run): the generator then stands where a single process's does."""
        for _ in range(n):      # one call a window, as next_train draws (the same values)
            self.rng.integers(0, self.n_train - self.seq_len)
        self.drawn += max(0, n)

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
        if "n_train" not in d:
            raise DataError("sampler state is of a run on an examples file, this data is a "
                            "token stream (resume on the same --data)")
        if (d["n_train"], d["seq_len"]) != (self.n_train, self.seq_len):
            raise DataError(f"sampler state is for {d['n_train']} training tokens and seq_len "
                            f"{d['seq_len']}, this data has {self.n_train} and {self.seq_len}")
        self.rng.bit_generator.state = d["bit_generator"]
        self.drawn = d["drawn"]


class Window:
    """One training window of packed examples, each array [seq_len]: ``x`` the input ids,
    ``y`` the targets (the next token within the example), ``weights`` 1.0 where the loss
    scores the prediction, else 0, ``positions`` the RoPE positions (restarting at 0 in each
    example), ``segment_starts`` the first position of each position's example (attention
    stays inside it); ``scored`` counts the scored positions, ``useful`` the positions
    scored or giving context to a scored one."""

    __slots__ = ("x", "y", "weights", "positions", "segment_starts", "scored", "useful")

    def __init__(self, examples, members, seq_len):
        S = seq_len
        self.x = np.zeros(S, np.int32)
        self.y = np.zeros(S, np.int32)
        self.weights = np.zeros(S, np.float32)
        self.positions = np.zeros(S, np.int32)
        self.segment_starts = np.arange(S, dtype=np.int32)  # padding attends only itself
        at = useful = 0
        for k in members:
            ids, mask = examples[int(k)]
            n = len(ids) - 1            # the last token predicts nothing: it is not an input
            self.x[at:at + n] = ids[:-1]
            self.y[at:at + n] = ids[1:]
            self.weights[at:at + n] = mask[1:]
            self.positions[at:at + n] = np.arange(n)
            self.segment_starts[at:at + n] = at
            useful += int(np.flatnonzero(mask)[-1])   # positions up to the last scored one
            at += n
        self.scored = int(np.count_nonzero(self.weights))
        self.useful = useful


class ExampleSampler:
    """Training windows of whole examples (never one cut) from an examples file: each epoch
    shuffles the examples (from the run's seed and the epoch's number) and packs them first
    fit into windows of seq_len positions (an example of n tokens takes n - 1: its inputs),
    then shuffles the windows. With ``one_per_window`` (the sim and ane backends, whose
    programs compile the causal mask and RoPE tables) each window holds one example, padded
    after it. Window i of the run is a function of (seed, i), so the state is the count of
    windows drawn. Validation reads the held-out examples file, packed the same way."""

    OPEN_WINDOWS = 64     # first fit looks at the last 64 windows opened: O(n) per epoch

    def __init__(self, examples, seq_len, seed, val_examples=None, one_per_window=False):
        self.examples, self.seq_len, self.seed = examples, int(seq_len), int(seed)
        self.val_examples, self.one_per_window = val_examples, bool(one_per_window)
        for ex in (examples, val_examples):
            if ex is None:
                continue
            longest = int(ex.lengths.max())
            if longest > self.seq_len:   # as prepare --seq-len cuts them
                raise DataError(f"{ex.path}: its longest example has {longest} tokens, more "
                                f"than the training window of {self.seq_len} (prepare it "
                                f"with --seq-len {self.seq_len}, or train with --seq-len "
                                f"{longest})")
        self.drawn = 0
        self._epoch, self._plan = None, None
        self._sizes = []                  # windows in each epoch planned so far
        self._val = None

    def _pack(self, epoch):
        rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        windows = self._first_fit(self.examples, rng.permutation(len(self.examples)))
        return [windows[i] for i in rng.permutation(len(windows))]

    def _first_fit(self, examples, order):
        """The examples in `order` packed first fit into windows (lists of examples)."""
        if self.one_per_window:
            return [[int(k)] for k in order]
        sizes = examples.lengths - 1
        windows, room, open_ = [], [], []
        for k in order:
            n = int(sizes[k])
            for w in open_:
                if room[w] >= n:
                    windows[w].append(int(k))
                    room[w] -= n
                    break
            else:
                windows.append([int(k)])
                room.append(self.seq_len - n)
                open_.append(len(windows) - 1)
                if len(open_) > self.OPEN_WINDOWS:
                    open_.pop(0)
        return windows

    def _members(self, i):
        """The examples of window i of the run (epochs planned in turn, the last kept)."""
        e, start = 0, 0
        while True:
            if e == len(self._sizes):
                self._epoch, self._plan = e, self._pack(e)
                self._sizes.append(len(self._plan))
            if i < start + self._sizes[e]:
                break
            start += self._sizes[e]
            e += 1
        if self._epoch != e:
            self._epoch, self._plan = e, self._pack(e)
        return self._plan[i - start]

    def window(self, i) -> Window:
        """Window i of the run (0-based)."""
        return Window(self.examples, self._members(i), self.seq_len)

    def next_train(self) -> Window:
        w = self.window(self.drawn)
        self.drawn += 1
        return w

    def val_windows(self):
        """Every held-out example, in order, packed as training packs them (None without
        a held-out file); the same every call."""
        if self.val_examples is None:
            return None
        if self._val is None:
            order = np.arange(len(self.val_examples))
            self._val = [Window(self.val_examples, members, self.seq_len)
                         for members in self._first_fit(self.val_examples, order)]
        return self._val

    def state_dict(self) -> dict:
        return {"kind": "examples", "drawn": self.drawn, "seed": self.seed,
                "examples": len(self.examples), "seq_len": self.seq_len,
                "one_per_window": self.one_per_window}

    def load_state_dict(self, d):
        mine = self.state_dict()
        for key in ("kind", "seed", "examples", "seq_len", "one_per_window"):
            if d.get(key) != mine[key]:
                raise DataError(f"sampler state is for {key} {d.get(key)!r}, this run has "
                                f"{mine[key]!r} (resume on the same examples file and backend)")
        self.drawn = int(d["drawn"])


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
