"""Tokenizers: text to token ids and back, for preparing data and reading samples.

``load(path)`` opens any of
- a SentencePiece ``.model`` (Llama 2's ``tokenizer.model``), through ``sentencepiece``;
- llama2.c's ``tokenizer.bin``, read and run here with no library: it encodes and decodes
  like SentencePiece does with the model it was exported from;
- a Hugging Face ``tokenizer.json``, or a model directory holding one (e.g. a local
  download of Qwen/Qwen3-0.6B), through ``tokenizers``.

Every tokenizer has ``kind``, ``path``, ``vocab_size``, ``bos_id`` and ``eos_id`` (None
when the vocabulary has no such token), ``encode(text, bos=False, eos=False)`` and
``decode(ids)``. ``builtin()`` decodes the ids of anecy's built-in corpus.
"""

import heapq
import re
import struct
from pathlib import Path

from . import corpus, jsonio
from .data import first_bad_id
from .errors import AnecyError, cannot_read

KINDS = ("sentencepiece", "llama2c", "hf", "builtin")
DATA_EXTRA = 'pip install "anecy[data]"'


def _require(module: str, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise AnecyError(f"{what} needs the Python package '{module}': "
                         f"run `{DATA_EXTRA}`") from None


def check_text(text: str, where: str, from_argv: bool = False) -> None:
    """Raise AnecyError (one line, starting with ``where``: a file and line, or "the
    prompt") unless ``text`` is valid Unicode that UTF-8 can encode. Python strings can
    hold lone surrogates (a JSON escape "\\ud800"; ``from_argv``, bytes that are not UTF-8
    on a command line, which Python keeps as U+DC80..U+DCFF); no tokenizer can take them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = (f"the byte 0x{c - 0xDC00:02x}, which is not UTF-8"
                if from_argv and 0xDC80 <= c <= 0xDCFF
                else f"a lone surrogate U+{c:04X}, which is not a character")
        raise AnecyError(f"{where}: not valid UTF-8 text ({what}, at character "
                         f"{e.start})") from None


class Tokenizer:
    """Text <-> token ids. Subclasses set the attributes and implement the two methods."""
    kind: str = ""
    path: str = ""
    vocab_size: int = 0
    bos_id = None
    eos_id = None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list:
        """The ids of ``text``, after BOS if ``bos``, before EOS if ``eos``."""
        check_text(text, "text to encode")
        ids = self._encode(text)
        if bos:
            ids.insert(0, self._special("bos"))
        if eos:
            ids.append(self._special("eos"))
        return ids

    def decode(self, ids) -> str:
        raise NotImplementedError

    def _encode(self, text: str) -> list:
        raise NotImplementedError

    def _special(self, which):
        i = getattr(self, f"{which}_id")
        if i is None:
            raise AnecyError(f"tokenizer {self.path} has no {which.upper()} token")
        return i

    def __repr__(self):
        return (f"Tokenizer(kind={self.kind!r}, path={self.path!r}, "
                f"vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})")


# -- SentencePiece ------------------------------------------------------------------------------

class SentencePieceTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path):
        spm = _require("sentencepiece", "a SentencePiece .model tokenizer")
        self.path = str(path)
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise AnecyError(f"{path}: not a SentencePiece model ({_first_line(e)})") from None
        self.vocab_size = int(self.sp.vocab_size())
        self.bos_id = _id_or_none(self.sp.bos_id())
        self.eos_id = _id_or_none(self.sp.eos_id())

    def _encode(self, text):
        return list(self.sp.encode(text))

    def decode(self, ids):
        ids = [int(i) for i in ids]
        _check_range(ids, self.vocab_size)
        return self.sp.decode(ids)


def _id_or_none(i):
    return None if i is None or i < 0 else int(i)


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _check_range(ids, vocab_size):
    bad = first_bad_id(ids, vocab_size)
    if bad is not None:
        raise AnecyError(f"token id {bad[1]} is outside the vocabulary of {vocab_size} tokens")


# -- llama2.c tokenizer.bin ---------------------------------------------------------------------

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
# llama2.c's export writes BOS and EOS as "\n<s>\n" and "\n</s>\n" and keeps "<unk>"
_UNK_PIECE = b"<unk>"
_CONTROL_PIECES = (b"\n<s>\n", b"\n</s>\n")


class Llama2cTokenizer(Tokenizer):
    """llama2.c's tokenizer.bin: int32 max_token_length, then for every token a float32
    score, an int32 byte length and the piece's UTF-8 bytes (SentencePiece's "▁" written as
    a space). The token count is not stored: it is whatever the file holds.

    Encoding is run.c's: a dummy-prefix space, one symbol per UTF-8 character (byte tokens
    <0xXX> for characters outside the vocabulary), then repeatedly the adjacent pair whose
    concatenation is the best-scoring piece is merged, the leftmost on ties. The pairs are
    kept in a heap instead of run.c's rescan, which gives the same merges in O(n log n).
    Byte, unknown and control pieces never take part in merges, and "▁" in the input reads as
    a space, as in SentencePiece (so text that happens to spell "<0x41>" stays text). BOS is 1
    and EOS is 2, as in run.c."""
    kind = "llama2c"

    def __init__(self, path):
        self.path = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise cannot_read(path, e, "tokenizer") from None
        if len(data) < 4:
            raise AnecyError(f"{path}: {len(data)} bytes, too short for a llama2.c tokenizer.bin")
        (max_len,) = struct.unpack_from("<i", data, 0)
        if not 0 < max_len <= 1 << 16:
            raise AnecyError(f"{path}: max_token_length {max_len} in the header; not a llama2.c "
                             "tokenizer.bin")
        pieces, scores, pos = [], [], 4
        while pos < len(data):
            if pos + 8 > len(data):
                raise AnecyError(f"{path}: truncated at token {len(pieces)} (byte {pos})")
            score, n = struct.unpack_from("<fi", data, pos)
            pos += 8
            if not 0 <= n <= max_len or pos + n > len(data):
                raise AnecyError(f"{path}: token {len(pieces)} has length {n} "
                                 f"(max_token_length {max_len}, {len(data) - pos} bytes left); "
                                 "truncated or not a llama2.c tokenizer.bin")
            pieces.append(data[pos:pos + n])
            scores.append(score)
            pos += n
        if len(pieces) < 3:
            raise AnecyError(f"{path}: {len(pieces)} tokens; not a llama2.c tokenizer.bin")
        self.pieces, self.scores = pieces, scores
        self.vocab_size = len(pieces)
        self.bos_id, self.eos_id = 1, 2
        self.byte_value = {}                 # id -> raw byte, for <0xXX> tokens
        self.byte_ids = [None] * 256         # raw byte -> id
        self.unk_id = None
        self.mergeable = {}                  # piece text -> id, for pieces merges may produce
        for i, p in enumerate(pieces):
            m = _BYTE_PIECE.fullmatch(p)
            if m:
                b = int(m.group(1), 16)
                self.byte_value[i] = b
                if self.byte_ids[b] is None:
                    self.byte_ids[b] = i
            elif p == _UNK_PIECE:
                self.unk_id = i if self.unk_id is None else self.unk_id
            elif i in (self.bos_id, self.eos_id) or p in _CONTROL_PIECES:
                pass
            else:
                self.mergeable.setdefault(p.decode("utf-8", "surrogateescape"), i)
        self.control = {self.bos_id, self.eos_id} | {
            i for i, p in enumerate(pieces) if p in _CONTROL_PIECES}

    def _encode(self, text):
        if not text:
            return []
        merge_ids, scores = self.mergeable, self.scores
        # SentencePiece reads its meta symbol "▁" in the input as a space, as it writes spaces
        text = text.replace("\u2581", " ")
        # symbols as a linked list; text[k] is None for a byte token (it never merges)
        sym_text, sym_id = [], []
        for ch in " " + text:
            i = merge_ids.get(ch)
            if i is not None:
                sym_text.append(ch)
                sym_id.append(i)
                continue
            for b in ch.encode("utf-8", "surrogateescape"):
                i = self.byte_ids[b]
                if i is None:
                    i = self.unk_id if self.unk_id is not None else 0
                sym_text.append(None)
                sym_id.append(i)
        n = len(sym_text)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap = []

        def push(a, b):
            ta, tb = sym_text[a], sym_text[b]
            if ta is None or tb is None:
                return
            merged = ta + tb
            i = merge_ids.get(merged)
            if i is not None:
                heapq.heappush(heap, (-scores[i], a, b, merged, i))

        for a in range(n - 1):
            push(a, a + 1)
        while heap:
            _, a, b, merged, i = heapq.heappop(heap)
            # stale when either side has merged since this pair was pushed
            if nxt[a] != b or sym_text[a] is None or sym_text[b] is None \
                    or sym_text[a] + sym_text[b] != merged:
                continue
            sym_text[a], sym_id[a] = merged, i
            sym_text[b] = None
            sym_id[b] = -1
            nxt[a] = nxt[b]
            if nxt[a] < n:
                prv[nxt[a]] = a
            if prv[a] >= 0:
                push(prv[a], a)
            if nxt[a] < n:
                push(a, nxt[a])
        return [i for i in sym_id if i >= 0]

    def decode(self, ids):
        # SentencePiece's rules: control tokens are invisible, <unk> reads " ⁇ ", runs of byte
        # tokens are UTF-8, and the first visible piece loses its leading (dummy-prefix) space.
        ids = [int(i) for i in ids]
        _check_range(ids, self.vocab_size)
        out = bytearray()
        first = True
        for i in ids:
            if i in self.control:
                continue
            if i in self.byte_value:
                out.append(self.byte_value[i])
            elif i == self.unk_id:
                out += " \u2047 ".encode()
            else:
                piece = self.pieces[i]
                if first and piece.startswith(b" "):
                    piece = piece[1:]
                out += piece
            first = False
        return out.decode("utf-8", "replace")


# -- Hugging Face tokenizers --------------------------------------------------------------------

class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizer.json``. BOS and EOS come from the ``tokenizer_config.json``
    beside it when there is one (Qwen3 has no BOS), else from the usual special tokens."""
    kind = "hf"

    def __init__(self, path):
        tokenizers = _require("tokenizers", "a Hugging Face tokenizer.json")
        path = Path(path)
        self.path = str(path)
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises bare Exceptions
            raise AnecyError(f"{path}: not a Hugging Face tokenizer.json "
                             f"({_first_line(e)})") from None
        # special tokens spelled out in the text stay text: a document quoting "<|endoftext|>"
        # must not end there
        self.tok.encode_special_tokens = True
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        self.bos_id, self.eos_id = self._specials(path.parent / "tokenizer_config.json")

    def _specials(self, config_path):
        def token_id(token):
            if isinstance(token, dict):
                token = token.get("content")
            return None if not token else self.tok.token_to_id(token)

        if config_path.is_file():
            try:
                cfg = jsonio.loads(config_path.read_bytes())
            except (OSError, ValueError) as e:
                raise AnecyError(f"{config_path}: unreadable ({_first_line(e)})") from None
            if not isinstance(cfg, dict):
                raise AnecyError(f"{config_path}: must hold a JSON object")
            return token_id(cfg.get("bos_token")), token_id(cfg.get("eos_token"))
        bos = token_id("<s>")
        eos = next((i for i in map(token_id, ("</s>", "<|endoftext|>")) if i is not None), None)
        return bos, eos

    def _encode(self, text):
        return list(self.tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids):
        ids = [int(i) for i in ids]
        _check_range(ids, self.vocab_size)
        return self.tok.decode(ids, skip_special_tokens=True)


# -- the built-in corpus ------------------------------------------------------------------------

# Llama-2 pieces (SentencePiece's "▁" as a space) of the ids the built-in corpus uses only
# inside longer words; every other id of the corpus is a whole piece of anecy.corpus._IDS.
_BUILTIN_SUBWORDS = {
    265: 'on', 282: ' p', 285: ' f', 289: ' b', 290: 'om', 317: ' S', 326: 'im', 341: ' M',
    348: 'un', 365: ' L', 376: ' "', 384: 'ck', 413: ' k', 417: 'lo', 423: 'ia', 434: 'ue',
    446: 'ke', 528: ' sh', 534: ' tr', 568: 'ite', 655: 'ma', 682: 'ink', 868: ' du', 885: ' sc',
    898: 'ond', 1056: 'na', 1270: 'cy', 1357: 'my', 1383: ' Sh', 1460: 'ny', 1576: 'The',
    1701: ' fo', 1965: 'ared', 2354: 'ily', 2381: ' sw', 2518: 'ara', 2653: ' pu', 2707: 'uck',
    2744: 'An', 2803: ' Let', 3112: 'It', 3226: 'Le', 3492: 'You', 4362: 'aring', 4591: 'From',
    4768: ' bi', 4901: 'iny', 5618: 'What', 6026: 'Em', 6028: 'Can', 6132: 'Do', 6411: ' bal',
    6716: 'One', 7976: 'Max', 9102: 'rog', 10784: ' clim', 11008: 'Why', 12024: 'Let',
    13711: 'Tim', 15597: 'They', 15870: 'Try', 20841: 'Ben', 21599: 'Tom', 22966: 'Sam',
    23717: 'ppy', 24126: 'Lu', 25271: 'Thank', 27006: 'Jack', 29362: 'Bob', 29877: 'o',
    29879: 's', 29890: 'b', 29891: 'y', 29902: 'I', 29903: 'S', 29909: 'A', 29915: "'",
    29916: 'x', 29924: 'M', 29931: 'L',
}
_NEWLINE_ID = 13   # <0x0A>


class BuiltinTokenizer(Tokenizer):
    """Decodes the Llama-2 ids of anecy's built-in corpus (and of a model trained on it);
    ids the corpus never uses read as " ⁇ ". It cannot encode: that needs the Llama-2
    tokenizer itself."""
    kind = "builtin"
    path = corpus.NAME
    vocab_size = 32000
    bos_id, eos_id = 1, 2

    def __init__(self):
        self.text = {_NEWLINE_ID: "\n", **_BUILTIN_SUBWORDS}
        self.text.update((ids[0], piece) for piece, ids in corpus._IDS.items() if len(ids) == 1)

    def _encode(self, text):
        raise AnecyError("the built-in corpus comes pretokenized and has no tokenizer to encode "
                         "with; use the Llama-2 tokenizer (--tokenizer tokenizer.model)")

    def decode(self, ids):
        ids = [int(i) for i in ids]
        _check_range(ids, self.vocab_size)
        out, first = [], True
        for i in ids:
            if i in (self.bos_id, self.eos_id):
                continue
            piece = self.text.get(i, " \u2047 ")
            if first and piece.startswith(" "):
                piece = piece[1:]
            out.append(piece)
            first = False
        return "".join(out)


def builtin() -> Tokenizer:
    """The decode-only tokenizer of anecy's built-in corpus."""
    return BuiltinTokenizer()


# -- loading ------------------------------------------------------------------------------------

def _kind_of_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "hf"
    if suffix == ".model":
        return "sentencepiece"
    if suffix == ".bin":
        return "llama2c"
    with open(path, "rb") as f:      # by content: JSON, a protobuf, else llama2.c's header
        head = f.read(16)
    if head.lstrip()[:1] == b"{":
        return "hf"
    if head[:1] == b"\x0a":
        return "sentencepiece"
    return "llama2c"


def load(path) -> Tokenizer:
    """The tokenizer at ``path``: a SentencePiece ``.model``, a llama2.c ``tokenizer.bin``, a
    Hugging Face ``tokenizer.json``, or a directory holding one of them (tokenizer.json
    first)."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise AnecyError(f"{path}: a directory without tokenizer.json, tokenizer.model or "
                             "tokenizer.bin")
    if not path.exists():
        from .fileio import missing
        why = missing(path)
        raise AnecyError(f"{path}: " + ("no such tokenizer file" if why == "no such file"
                                        else f"{why} (a tokenizer)"))
    try:
        kind = _kind_of_file(path)
    except OSError as e:
        raise cannot_read(path, e, "tokenizer") from None
    cls = {"hf": HFTokenizer, "sentencepiece": SentencePieceTokenizer,
           "llama2c": Llama2cTokenizer}[kind]
    return cls(path)
