"""JSON from files a user hands anecy, parsed with a nesting limit.

Every JSON anecy reads (token-file sidecars, JSONL data, metrics files, HF ``config.json``
and shard indexes, safetensors and checkpoint headers, ``tokenizer_config.json``) goes
through ``loads``. Python's parser recurses once per nesting level, so a line of 100,000
``[`` would end in a RecursionError (or worse) instead of a message; ``loads`` refuses it
first. No file anecy reads nests more than a few levels, so the limit costs nothing."""

import json
import re

MAX_DEPTH = 100

# a JSON string, escapes included: brackets inside strings do not nest anything
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JSONError(ValueError):
    """Text that is not JSON anecy reads; the message says why, in a few words (callers put
    the file and line in front)."""


def depth(text: str) -> int:
    """How deep the arrays and objects of the JSON ``text`` nest (0 for a scalar)."""
    if text.count("[") + text.count("{") <= 1:   # the common case, in one pass in C
        return int("[" in text or "{" in text)
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    level = deepest = 0
    for c in brackets:
        if c in "[{":
            level += 1
            if level > deepest:
                deepest = level
        else:
            level -= 1
    return deepest


def loads(text, max_depth: int = MAX_DEPTH):
    """The value of the JSON ``text`` (str, or bytes that must be UTF-8); a JSONError when
    it is not JSON, not UTF-8, or nests deeper than ``max_depth``."""
    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONError(f"not UTF-8 ({e.reason} at byte {e.start})") from None
    if text.count("[") + text.count("{") > max_depth and depth(text) > max_depth:
        raise JSONError(f"nested more than {max_depth} levels deep")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise JSONError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:   # cannot happen below the limit; kept as a last guard
        raise JSONError(f"nested more than {max_depth} levels deep") from None
    except ValueError as e:  # a number too long to convert, say
        raise JSONError(str(e).split(";")[0]) from None
