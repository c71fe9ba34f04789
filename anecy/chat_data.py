"""Instruction and chat data: JSONL records rendered in a model's chat template, each token
flagged for the loss, written as an examples file (``anecy prepare --format``).

Records are mlx-lm's three kinds: chat ``{"messages": [{"role", "content"}, ...]}`` (with
an optional ``"tools"`` list handed to the template), completions ``{"prompt",
"completion"}`` (a user turn and an assistant turn) and text ``{"text"}``. ``auto`` decides
from the first record of each file, as mlx-lm does: prompt and completion, else messages,
else text.

Chat and completions records are rendered by transformers' ``apply_chat_template`` with the
template of a Hugging Face tokenizer directory (or one given in a file), so the ids are the
ones transformers gives. With ``mask_prompt`` only the assistant turns are scored: an
assistant turn starts where the template's rendering of the conversation before it, with
the generation prompt, ends (mlx-lm's rule, applied to every assistant turn), and ends at
the template's end-of-turn token (or EOS), which it includes, so that the model learns to
stop. Each such rendering must be a token prefix of the whole conversation's; a template
that breaks that is refused rather than guessed at. Text records are BOS (when the
tokenizer has one), their ids and EOS, all scored. An example's first token is never scored
(nothing predicts it).

Examples longer than ``seq_len`` tokens are truncated (or dropped with ``drop_long``);
examples left without a scored token are dropped; both are counted in the summary and the
sidecar. The file format is anecy.data's examples format.
"""

import hashlib
import json
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import numpy as np

from . import jsonio
from . import tokenizer as tokenizers
from .data import EXAMPLES_FORMAT, mask_path, offsets_path, sidecar_path, token_dtype
from .errors import AnecyError, DataError
from .fileio import atomic_write
from .tokenizer import check_text

FORMATS = ("auto", "chat", "completions", "text")
ROLES = ("system", "user", "assistant", "tool")
# the roles a turn may follow (None: the start of the conversation)
FOLLOWS = {"system": (None,), "user": (None, "system", "assistant"),
           "assistant": ("user", "tool"), "tool": ("assistant", "tool")}
# the training window's length by default: anecy train's default seq_len
DEFAULT_SEQ_LEN = 256
# a conversation the end-of-turn token is read from (see ChatTemplate)
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


class RecordError(DataError):
    """A record that cannot become an example; the caller adds its file and line."""


# -- the chat template --------------------------------------------------------------------------

class ChatTemplate:
    """A Hugging Face tokenizer (its ``tokenizer.json`` and ``tokenizer_config.json``, read
    by transformers) and its chat template, or the one in ``template_file``.

    ``render(messages, tools, add_generation_prompt)`` gives the ids transformers'
    ``apply_chat_template`` gives. ``end_of_turn_id`` is the special token that ends an
    assistant turn: the first special token the template writes after an assistant's text
    (``<|im_end|>`` for ChatML, ``</s>`` for Llama 2); ``stop_ids`` adds EOS."""

    def __init__(self, path, template_file=None):
        transformers = tokenizers._require("transformers", "a chat template")
        path = Path(path)
        directory = path if path.is_dir() else path.parent
        if not (directory / "tokenizer.json").is_file():
            raise AnecyError(f"{path}: chat templates need a Hugging Face tokenizer directory "
                             "(tokenizer.json and tokenizer_config.json)")
        self.path = directory
        try:
            self.tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise AnecyError(f"{directory}: transformers cannot load its tokenizer "
                             f"({tokenizers._first_line(e)})") from None
        if template_file is not None:
            try:
                self.tok.chat_template = Path(template_file).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise AnecyError(f"{template_file}: cannot read the chat template "
                                 f"({getattr(e, 'strerror', None) or e})") from None
            self.source = str(Path(template_file).resolve())
        else:
            self.source = str((directory / "tokenizer_config.json").resolve())
        template = self.tok.chat_template
        if not template:
            raise AnecyError(f"{directory}: its tokenizer has no chat template "
                             "(tokenizer_config.json's chat_template); name one with "
                             "--chat-template FILE")
        if not isinstance(template, str):   # named templates
            template = json.dumps(template, sort_keys=True)
        self.sha256 = hashlib.sha256(template.encode("utf-8")).hexdigest()
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        special = {i for i, t in self.tok.added_tokens_decoder.items() if t.special}
        self.special_ids = special | set(self.tok.all_special_ids)
        self.end_of_turn_id = self._end_of_turn()
        self.stop_ids = sorted({self.end_of_turn_id} | ({self.eos_id} - {None}))

    def render(self, messages, tools=None, add_generation_prompt=False) -> list:
        try:
            ids = self.tok.apply_chat_template(messages, tools=tools, tokenize=True,
                                               return_dict=False,
                                               add_generation_prompt=add_generation_prompt)
        except Exception as e:  # noqa: BLE001 - a template can raise anything
            raise RecordError(f"the chat template fails: {tokenizers._first_line(e)}") from None
        return [int(i) for i in ids]

    def _end_of_turn(self) -> int:
        try:
            prompt = self.render(_PROBE[:1], add_generation_prompt=True)
            whole = self.render(_PROBE)
        except RecordError as e:
            raise AnecyError(f"{self.source}: {e} on a user and an assistant turn") from None
        common = 0   # the answer starts after the tokens the two renderings share
        while common < min(len(prompt), len(whole)) and prompt[common] == whole[common]:
            common += 1
        for i in whole[common:]:
            if i in self.special_ids:
                return i
        raise AnecyError(f"{self.source}: the chat template writes no special token after an "
                         "assistant's text, so a model trained on it would not learn to stop")

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def example(self, messages, tools=None, mask_prompt=False):
        """The ids of a conversation and their loss flags (see the module docstring)."""
        ids = self.render(messages, tools)
        mask = np.zeros(len(ids), bool)
        if not mask_prompt:
            mask[1:] = True
            return ids, mask
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        starts = []
        for n, i in enumerate(turns, 1):
            prefix = self.render(messages[:i], tools, add_generation_prompt=True)
            if ids[:len(prefix)] != prefix:
                at = next(j for j, (a, b) in enumerate(zip(prefix, ids + [None] * len(prefix)))
                          if a != b)
                raise RecordError(f"the chat template renders the conversation before "
                                  f"assistant turn {n} as tokens that are not a prefix of the "
                                  f"whole conversation's (they differ at token {at}), so "
                                  "where the answer starts is unknown")
            starts.append(len(prefix))
        stops = set(self.stop_ids)
        for n, start in enumerate(starts):
            limit = starts[n + 1] if n + 1 < len(starts) else len(ids)
            end = next((j for j in range(start, limit) if ids[j] in stops), None)
            if end is None:
                raise RecordError(f"the chat template writes no end-of-turn token "
                                  f"({self.tok.convert_ids_to_tokens(self.end_of_turn_id)}) "
                                  f"after assistant turn {n + 1}")
            mask[start:end + 1] = True
        return ids, mask


# -- records ------------------------------------------------------------------------------------

def _detected_kind(obj):
    if "prompt" in obj and "completion" in obj:
        return "completions"
    if "messages" in obj:
        return "chat"
    return "text" if "text" in obj else None


def record_kind(obj, fmt="auto") -> str:
    """chat, completions or text: ``fmt``, or for auto what the record's keys say (mlx-lm's
    order: prompt and completion, else messages, else text)."""
    if not isinstance(obj, dict):
        raise RecordError(f"a JSON line must be an object, not a {type(obj).__name__}")
    if fmt != "auto":
        return fmt
    kind = _detected_kind(obj)
    if kind is None:
        raise RecordError("a record needs \"messages\", \"prompt\" and \"completion\", or "
                          "\"text\"")
    return kind


def _string(obj, key, what=None):
    if key not in obj:
        raise RecordError(f"{what or 'the record'} has no {key!r}")
    if not isinstance(obj[key], str):
        raise RecordError(f"{what or 'the record'}: {key!r} is a {type(obj[key]).__name__}, "
                          "not a string")
    return obj[key]


def conversation(obj, kind):
    """(messages, tools) of a chat or completions record, checked: roles known and in order
    (an optional system turn first, then user turns each answered by the assistant, tool
    results after an assistant turn), string contents, ending with the assistant's turn."""
    if kind == "completions":
        return [{"role": "user", "content": _string(obj, "prompt")},
                {"role": "assistant", "content": _string(obj, "completion")}], None
    messages, tools = obj.get("messages"), obj.get("tools")
    if not isinstance(messages, list):
        raise RecordError(f"\"messages\" is a {type(messages).__name__}, not a list")
    if not messages:
        raise RecordError("\"messages\" is an empty conversation")
    previous = None
    for n, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise RecordError(f"message {n} is a {type(m).__name__}, not an object")
        role = m.get("role")
        if role not in ROLES:
            raise RecordError(f"message {n}: role {role!r} is not one of {', '.join(ROLES)}")
        _string(m, "content", f"message {n} ({role})")
        if previous not in FOLLOWS[role]:
            raise RecordError(f"message {n}: a {role} turn cannot follow "
                              f"{'a ' + previous + ' turn' if previous else 'the start'} "
                              "(roles out of order)")
        previous = role
    if previous != "assistant":
        raise RecordError(f"the conversation ends with a {previous} turn, not the assistant's")
    if tools is not None and not (isinstance(tools, list)
                                  and all(isinstance(t, dict) for t in tools)):
        raise RecordError("\"tools\" must be a list of objects")
    return messages, tools


class Encoder:
    """Records to ``(ids, mask)`` with a tokenizer (for text) and, made when the first chat
    or completions record needs it, its chat template."""

    def __init__(self, tokenizer, chat_template=None, mask_prompt=False):
        self.tok = tokenizer
        self.template_file, self.mask_prompt = chat_template, mask_prompt
        self.template = None

    def chat(self) -> ChatTemplate:
        if self.template is None:
            if self.tok.kind != "hf":
                raise AnecyError(f"{self.tok.path}: chat and completions records need a "
                                 "Hugging Face tokenizer directory with a chat template, "
                                 f"not a {self.tok.kind} tokenizer")
            self.template = ChatTemplate(self.tok.path, self.template_file)
        return self.template

    def text(self, text):
        if self.tok.eos_id is None:
            raise AnecyError(f"tokenizer {self.tok.path} has no EOS token to end text "
                             "records with")
        ids = self.tok.encode(text, bos=self.tok.bos_id is not None, eos=True)
        mask = np.ones(len(ids), bool)
        mask[0] = False
        return ids, mask

    def record(self, obj, kind):
        """(ids, mask) of a record; None for a text record with no text."""
        if kind == "text":
            text = _string(obj, "text").strip()
            return self.text(text) if text else None
        messages, tools = conversation(obj, kind)
        return self.chat().example(messages, tools, self.mask_prompt)


# -- reading inputs -----------------------------------------------------------------------------

def _first_record(path: Path):
    """The first JSON line of ``path`` when it is an object, else None."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    obj = jsonio.loads(line)
                    return obj if isinstance(obj, dict) else None
    except (OSError, ValueError):
        return None
    return None


def holds_conversations(paths) -> bool:
    """Whether the first record of one of ``paths`` is a chat or completions record (which
    only an examples file can hold)."""
    for path in map(Path, paths):
        obj = _first_record(path) if path.is_file() else None
        if obj is not None and _detected_kind(obj) in ("chat", "completions"):
            return True
    return False


def records(paths, fmt, separator=None):
    """(where, kind, record, bytes read) of every record of the inputs, in order: JSON lines
    (kind by ``fmt``, or for auto from each file's first record), and for auto and text
    the documents of plain text files."""
    from .prepare import JSONL_SUFFIXES, _lines, text_documents
    for path in map(Path, paths):
        if path.suffix.lower() not in JSONL_SUFFIXES and _first_record(path) is None:
            if fmt not in ("auto", "text"):
                raise AnecyError(f"{path}: not JSON lines; --format {fmt} reads JSONL")
            with open(path, "rb") as f:
                docs = text_documents(_lines(path, f), separator)
                for n, (text, size) in enumerate(docs, 1):
                    where = f"{path}: document {n}"
                    check_text(text, where)
                    yield where, "text", {"text": text}, size
            continue
        with open(path, "rb") as f:
            yield from _json_records(path, _lines(path, f), fmt)


def _json_records(path, lines, fmt):
    """records() of one JSONL file's ``lines``."""
    kind, pending = None, 0
    for lineno, line, size in lines:
        pending += size
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = jsonio.loads(line)
        except ValueError as e:
            raise AnecyError(f"{where}: not a JSON line ({e})") from None
        _check_strings(obj, where)
        try:
            kind = kind or record_kind(obj, fmt)
            if fmt == "auto" and record_kind(obj, "auto") != kind:
                raise RecordError(f"a {record_kind(obj, 'auto')} record in a file of "
                                  f"{kind} records")
        except RecordError as e:
            raise AnecyError(f"{where}: {e}") from None
        yield where, kind, obj, pending
        pending = 0
    if pending:
        yield None, None, None, pending


def _check_strings(obj, where):
    """check_text on every string of a parsed record (a JSON escape can make a lone
    surrogate, which no tokenizer takes)."""
    if isinstance(obj, str):
        check_text(obj, where)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _check_strings(key, where)
            _check_strings(value, where)
    elif isinstance(obj, list):
        for value in obj:
            _check_strings(value, where)


# -- the command's work -------------------------------------------------------------------------

class ExamplesWriter:
    """One examples file being written: ids, offsets and the packed mask."""

    def __init__(self, path: Path, dtype):
        self.path, self.dtype = path, dtype
        self.offsets = [0]
        self.scored = 0
        self.longest = 0
        self.pending_bits = np.zeros(0, bool)   # flags not yet a whole byte
        self.ids_file = self.mask_file = self.offsets_file = None

    def open(self, stack: ExitStack):
        self.ids_file = stack.enter_context(atomic_write(self.path))
        self.mask_file = stack.enter_context(atomic_write(mask_path(self.path)))
        self.offsets_file = stack.enter_context(atomic_write(offsets_path(self.path)))

    def add(self, ids, mask):
        self.ids_file.write(np.asarray(ids, self.dtype).tobytes())
        self.offsets.append(self.offsets[-1] + len(ids))
        self.scored += int(mask.sum())
        self.longest = max(self.longest, len(ids))
        bits = np.concatenate([self.pending_bits, mask])
        whole = bits.size - bits.size % 8
        self.mask_file.write(np.packbits(bits[:whole], bitorder="little").tobytes())
        self.pending_bits = bits[whole:]

    def finish(self):
        """Write what is still held (the last flags, the offsets); the files are renamed into
        place when the ExitStack ends without an error."""
        if self.pending_bits.size:
            self.mask_file.write(np.packbits(self.pending_bits, bitorder="little").tobytes())
        self.offsets_file.write(np.asarray(self.offsets, "<u8").tobytes())

    @property
    def examples(self):
        return len(self.offsets) - 1

    @property
    def tokens(self):
        return self.offsets[-1]


def check_seq_len(seq_len):
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise AnecyError(f"--seq-len must be an integer >= 2 (an example is a token and the "
                         f"next one it predicts at least), got {seq_len!r}")


def prepare_examples(inputs, tokenizer, out, fmt="auto", chat_template=None, mask_prompt=False,
                     seq_len=DEFAULT_SEQ_LEN, drop_long=False, val_frac=0.0, separator=None,
                     progress=True, log=print) -> dict:
    """Render and tokenize the records of ``inputs`` into the examples file ``out`` (and its
    held-out file with ``val_frac``: every example whose turn it is, as ``anecy.prepare``
    spreads documents); returns the sidecar written beside ``out``."""
    from tqdm import tqdm

    from .fileio import check_writable
    from .prepare import _check_inputs, _close_bar, val_path_for, write_sidecar

    out = Path(out)
    if fmt not in FORMATS:
        raise AnecyError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    check_seq_len(seq_len)
    if not 0.0 <= val_frac < 1.0:
        raise AnecyError(f"--val-frac must be in [0, 1), got {val_frac}")
    _check_inputs(inputs)
    for p in map(Path, inputs):   # examples files read an input twice (its kind, its records)
        if not p.is_file():
            raise AnecyError(f"{p}: examples are prepared from regular files, not pipes or "
                             "devices")
    if chat_template is not None and not Path(chat_template).is_file():
        raise AnecyError(f"{chat_template}: no such chat template file")
    outputs = [out] + ([val_path_for(out)] if val_frac else [])
    for p in outputs:
        for f in (p, sidecar_path(p), offsets_path(p), mask_path(p)):
            check_writable(f, inputs=[*inputs, tokenizer, chat_template or tokenizer])
    tok = tokenizers.load(tokenizer)
    encoder = Encoder(tok, chat_template, mask_prompt)
    if fmt in ("chat", "completions"):
        encoder.chat()   # a tokenizer without a template fails now, not at the first record
    dtype = token_dtype(tok.vocab_size)
    train, val = ExamplesWriter(out, dtype), ExamplesWriter(val_path_for(out), dtype)
    kinds, truncated, dropped_long, unscored, kept = Counter(), 0, 0, 0, 0
    total_bytes = sum(Path(p).stat().st_size for p in inputs)
    with ExitStack() as stack:
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress,
                   desc="prepare", dynamic_ncols=True)
        stack.push(lambda *exc: _close_bar(bar, failed=exc[0] is not None))
        train.open(stack)
        if val_frac:
            val.open(stack)
        for where, kind, obj, size in records(inputs, fmt, separator):
            bar.update(size)
            if kind is None:
                continue
            try:
                example = encoder.record(obj, kind)
            except RecordError as e:
                raise AnecyError(f"{where}: {e}") from None
            if example is None:
                continue
            ids, mask = example
            kinds[kind] += 1
            if len(ids) > seq_len:
                if drop_long:
                    dropped_long += 1
                    continue
                truncated += 1
                ids, mask = ids[:seq_len], mask[:seq_len]
            if not mask.any():
                unscored += 1
                continue
            bad = [i for i in ids if not 0 <= i < tok.vocab_size]
            if bad:
                raise AnecyError(f"{where}: token id {bad[0]} is outside the tokenizer's "
                                 f"vocabulary of {tok.vocab_size}")
            held_out = val_frac and int((kept + 1) * val_frac) > int(kept * val_frac)
            (val if held_out else train).add(ids, mask)
            kept += 1
        if not kept:
            raise AnecyError("no examples in " + ", ".join(map(str, inputs)) +
                             (" (empty input)" if not sum(kinds.values()) else
                              f" ({dropped_long} too long, {unscored} with no scored token)"))
        if val_frac and not val.examples:
            raise AnecyError(f"--val-frac {val_frac} holds out none of the {kept} examples; "
                             "give more data or a larger fraction")
        train.finish()
        if val_frac:
            val.finish()

    template = encoder.template
    meta = {
        "format": EXAMPLES_FORMAT,
        "tokenizer": {"kind": tok.kind, "path": str(Path(tok.path).resolve())},
        "vocab_size": tok.vocab_size, "dtype": dtype.name,
        "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "chat_template": None if template is None else {"source": template.source,
                                                         "sha256": template.sha256},
        "end_of_turn_id": None if template is None else template.end_of_turn_id,
        "mask_prompt": bool(mask_prompt), "seq_len": seq_len,
        "sources": [str(Path(p).resolve()) for p in inputs],
    }

    def counts(w):
        return {"examples": w.examples, "tokens": w.tokens, "scored_tokens": w.scored,
                "max_example_tokens": w.longest}

    train_meta = dict(meta, split="train" if val_frac else "all", **counts(train),
                      records=dict(sorted(kinds.items())), truncated=truncated,
                      dropped_long=dropped_long, dropped_unscored=unscored)
    if val_frac:
        train_meta["val"] = dict(path=val.path.name, fraction=val_frac, **counts(val))
        write_sidecar(val.path, dict(meta, split="val", train=train.path.name, **counts(val)))
    write_sidecar(train.path, train_meta)
    for w in (train, val) if val_frac else (train,):
        log(f"{w.path}: {w.tokens:,} tokens ({dtype.name}) in {w.examples:,} examples, "
            f"{w.scored:,} of them scored")
    notes = [f"{truncated:,} truncated to --seq-len {seq_len}" if truncated else "",
             f"{dropped_long:,} longer than --seq-len {seq_len} dropped" if dropped_long else "",
             f"{unscored:,} with no scored token dropped" if unscored else ""]
    if any(notes):
        log("examples: " + ", ".join(n for n in notes if n))
    return train_meta
