"""Text generation on the CPU: a Model's fp32 weights, a KV cache and a sampler.

Decoding does not go through the training engine (it runs whole windows of seq_len tokens).
A Decoder feeds tokens through the layers with the compiled decoder (anecy/_decode.pyx): a
prompt all at once in batched sgemms, then one token per step, each step's matrix-vector
products split by rows across ``threads`` threads, each token attending to the keys and
values of every earlier position, which stay in a cache allocated once per Decoder. The
weights are the Model's own arrays (nothing is copied), in the Model's RoPE order, so both
RoPE styles, GQA, QK-norm and tied or untied classifiers decode as they train. The logits
do not depend on the number of threads (each dot product is summed in one fixed order).

Sampling follows HF's order: temperature, then top-k, then top-p (nucleus); temperature 0 is
greedy (argmax). A seed makes a run reproducible."""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ._decode import DecodeCore
from .config import DECODE_DTYPES, MAX_DECODE_THREADS
from .data import first_bad_id
from .errors import AnecyError, ConfigError
from .model import Model


def default_threads() -> int:
    """The cores this process may run on (at most MAX_DECODE_THREADS)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    return max(1, min(cores, MAX_DECODE_THREADS))


@dataclass
class SamplingConfig:
    """How the next token is picked from the logits."""
    temperature: float = 1.0     # 0: greedy
    top_p: float = 1.0           # keep the most likely tokens up to this probability mass
    top_k: int = 0               # keep the k most likely tokens; 0: all
    seed: int | None = None      # None: a fresh seed from the OS

    def __post_init__(self):
        t, p, k = self.temperature, self.top_p, self.top_k
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < math.inf:
            raise ConfigError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ConfigError(f"top_k must be an integer >= 0, got {k!r}")


class Decoder:
    """A Model's weights ready for decoding, with a KV cache of ``max_len`` positions
    (default: the model's seq_len, its context length), decoding on ``threads`` threads
    (default: default_threads()) from the weights in ``dtype`` (one of DECODE_DTYPES).

    A Model trained with vocabulary compaction (``model.active_ids`` set) only ever learnt
    to score the tokens of its data: the other tokens' logits are -inf."""

    def __init__(self, model: Model, max_len: int | None = None, threads: int | None = None,
                 dtype: str = "f32"):
        cfg = model.config
        self.config = cfg
        self.max_len = cfg.seq_len if max_len is None else max_len
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, (int, np.integer)) \
                or self.max_len < 1:
            raise ConfigError(f"max_len must be a positive integer, got {max_len!r}")
        self.max_len = int(self.max_len)
        self.threads = default_threads() if threads is None else threads
        if isinstance(self.threads, bool) or not isinstance(self.threads, (int, np.integer)) \
                or self.threads < 1:
            raise ConfigError(f"threads must be a positive integer, got {threads!r}")
        self.threads = int(self.threads)
        if dtype not in DECODE_DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DECODE_DTYPES)}, got {dtype!r}")
        self.dtype = dtype
        cls = "model.embed_tokens.weight" if cfg.tie_embeddings else "lm_head.weight"
        classifier = model.views[cls]
        self.active_ids = model.active_ids
        if self.active_ids is not None:   # [n_active, D], a copy of today's rows
            classifier = np.ascontiguousarray(classifier[self.active_ids])
            self.logits = np.full(cfg.vocab_size, -np.inf, np.float32)
        self.core = DecodeCore(cfg, model.views, classifier, self.max_len, self.threads,
                               dtype == "q8")
        self.pos = 0

    @property
    def prefilled(self) -> int:
        """Positions computed as a prompt (in batched sgemms) so far."""
        return self.core.prefill_positions

    def reset(self):
        """Forget every position (the cache is reused, not reallocated)."""
        self.pos = 0

    def step(self, tokens: Sequence[int]) -> np.ndarray:
        """Feed ``tokens`` at the next positions; return the logits [vocab] after the last."""
        cfg = self.config
        ids = np.asarray(tokens, np.int64).reshape(-1)
        T, p0 = ids.size, self.pos
        if T == 0:
            raise ConfigError("no tokens to decode")
        if p0 + T > self.max_len:
            raise ConfigError(f"{p0 + T} positions exceed the context of {self.max_len} tokens")
        if first_bad_id(ids, cfg.vocab_size) is not None:
            raise ConfigError(f"token ids must be in [0, {cfg.vocab_size})")
        if T == 1:
            self.core.decode(int(ids[0]), p0)
        else:
            self.core.prefill(ids.astype(np.int32), p0)
        self.pos = p0 + T
        if self.active_ids is None:
            return self.core.logits.copy()
        self.logits[self.active_ids] = self.core.logits
        return self.logits.copy()


# -- sampling ------------------------------------------------------------------------------
def next_token_probs(logits, temperature: float, top_k: int = 0, top_p: float = 1.0):
    """The distribution the next token is drawn from (float64, sums to 1): softmax of
    logits / temperature, cut to the top_k most likely tokens and then to the smallest set
    of most likely tokens whose mass reaches top_p. Temperature 0 puts all mass on the
    argmax."""
    logits = np.asarray(logits, np.float64)
    probs = np.zeros_like(logits)
    if temperature == 0:
        probs[int(np.argmax(logits))] = 1.0
        return probs
    z = logits / temperature
    ids = np.arange(z.size)
    if top_k and top_k < z.size:
        ids = np.argpartition(-z, top_k - 1)[:top_k]
    kept = np.exp(z[ids] - z[ids].max())
    kept /= kept.sum()
    if top_p < 1.0:
        # a token below this cutoff cannot be in the nucleus (llama2.c's run.c sorts only the
        # rest): the tokens at or after it would hold less than 1 - top_p in all
        near = kept >= (1.0 - top_p) / max(kept.size - 1, 1)
        near[np.argmax(kept)] = True
        ids, kept = ids[near], kept[near]
        order = np.lexsort((ids, -kept))          # most likely first, ties by id
        ids, kept = ids[order], kept[order]
        # keep tokens while the mass before them is below top_p (the first always stays)
        n = max(1, int(np.count_nonzero(np.cumsum(kept) - kept < top_p)))
        ids, kept = ids[:n], kept[:n]
    probs[ids] = kept / kept.sum()
    return probs


def sample(logits, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """One token id drawn from next_token_probs(logits, ...) with ``rng``."""
    if cfg.temperature == 0:
        return int(np.argmax(logits))
    probs = next_token_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
    cdf = np.cumsum(probs)
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


class Session:
    """Decoding that keeps its place: the Decoder's cache holds the keys and values of
    ``tokens``, and ``feed(ids)`` makes it hold ``ids`` instead by computing only the
    positions from the first token where the two differ, so a conversation that grows by a
    turn prefills only that turn. ``prefilled`` counts the positions fed that way (prompts,
    not the tokens ``reply`` generates). The sampler's generator lives as long as the
    session: a seeded conversation is reproducible."""

    def __init__(self, model: Model, max_len: int | None = None,
                 sampling: SamplingConfig | None = None, decoder: Decoder | None = None,
                 threads: int | None = None, dtype: str = "f32"):
        self.decoder = decoder or Decoder(model, max_len, threads, dtype)
        self.decoder.reset()
        self.sampling = sampling or SamplingConfig()
        self.rng = np.random.Generator(np.random.PCG64(self.sampling.seed))
        self.tokens = []       # the ids whose keys and values the cache holds, in order
        self.prefilled = 0
        self.logits = None     # after the last of ``tokens``

    @property
    def max_len(self) -> int:
        return self.decoder.max_len

    def reset(self):
        """Forget every position."""
        self.tokens, self.logits = [], None
        self.decoder.reset()

    def feed(self, ids: Sequence[int]) -> np.ndarray:
        """Make the cache hold ``ids`` (a non-empty list) and return the logits after the
        last of them."""
        ids = [int(t) for t in ids]
        if not ids:
            raise ConfigError("the prompt needs at least one token (a BOS token, say)")
        if len(ids) > self.max_len:
            raise ConfigError(f"the prompt has {len(ids)} tokens, more than the context of "
                              f"{self.max_len}")
        keep = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)   # the logits after the last token come from feeding it
        del self.tokens[keep:]
        self.logits = None
        self.decoder.pos = keep
        logits = self.decoder.step(ids[keep:])
        self.tokens.extend(ids[keep:])
        self.prefilled += len(ids) - keep
        self.logits = logits
        return logits

    def reply(self, max_new_tokens: int, stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` ids following the tokens fed, one at a time as
        they are decided, each fed back before the next is picked (the last one is not: the
        next ``feed`` does it). Stops early at a token of ``stop_ids`` (not yielded, not
        fed) or at the end of the context."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if self.logits is None:
            raise ConfigError("nothing to reply to: feed the prompt first")
        stop = {int(s) for s in stop_ids}
        for i in range(max_new_tokens):
            token = sample(self.logits, self.sampling, self.rng)
            if token in stop:
                return
            yield token
            if i + 1 == max_new_tokens or self.decoder.pos == self.max_len:
                return
            logits = self.decoder.step([token])
            self.tokens.append(token)
            self.logits = logits


def generate(model: Model, prompt: Sequence[int], max_new_tokens: int,
             sampling: SamplingConfig | None = None, stop_ids: Sequence[int] = (),
             decoder: Decoder | None = None, threads: int | None = None) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids following ``prompt`` (a non-empty list of
    ids), one at a time as they are decided: a fresh Session's reply to the prompt. Stops
    early at a token of ``stop_ids`` (not yielded) or at the end of the context (the
    model's seq_len, or the decoder's max_len). ``threads``: the new Decoder's, when
    ``decoder`` is not given."""
    session = Session(model, sampling=sampling, decoder=decoder, threads=threads)
    session.feed(prompt)
    yield from session.reply(max_new_tokens, stop_ids)


def stream_text(decode, prompt: Sequence[int], tokens: Iterator[int]) -> Iterator[str]:
    """The text of prompt + tokens as it grows, in pieces: first the prompt's text, then what
    each token adds. ``decode(ids) -> str`` decodes a whole sequence (tokenizers treat the
    start of a text specially, so the sequence is decoded whole, not token by token); text
    ending in an incomplete UTF-8 character (U+FFFD) waits for the token that completes it."""
    ids = list(prompt)
    shown = decode(ids).rstrip("\ufffd")
    yield shown
    for token in tokens:
        ids.append(token)
        text = decode(ids)
        if text.endswith("\ufffd"):
            continue
        if text.startswith(shown):
            piece = text[len(shown):]
        else:   # a decoder that rewrote earlier text: show only what is new after it
            common = 0
            while common < min(len(text), len(shown)) and text[common] == shown[common]:
                common += 1
            piece = text[max(common, len(shown)):]
        shown = text
        if piece:
            yield piece
    rest = decode(ids)
    if len(rest) > len(shown) and rest.startswith(shown):
        yield rest[len(shown):]


def training_sample(model: Model, tokenizer=None, n_tokens: int = 48) -> str:
    """A short greedy sample of a model in training, from BOS (from EOS, the document
    separator, for vocabularies without BOS), decoded by ``tokenizer``; the ids themselves
    when there is no tokenizer or it cannot decode them (Llama-2 conventions then: BOS 1,
    EOS 2). Never raises for the tokenizer's sake: a sample must not end a training run."""
    bos, eos = 1, 2
    if tokenizer is not None:
        bos, eos = tokenizer.bos_id, tokenizer.eos_id
    start = bos if bos is not None else eos
    stops = [i for i in (bos, eos) if i is not None]
    decoder = Decoder(model, max_len=min(model.config.seq_len, n_tokens + 1))
    ids = list(generate(model, [start], n_tokens, SamplingConfig(temperature=0), stops,
                        decoder))
    if not ids:
        return "'' (the model's first pick ended the text)"
    why = "pass --tokenizer to read them"
    if tokenizer is not None:
        try:
            return repr(tokenizer.decode([start] + ids))
        except AnecyError as e:
            why = str(e)
    return "ids " + " ".join(map(str, ids)) + f" ({why})"


class TrainingSampler:
    """Samples while training, decoded by the tokenizer named (``path``), else the one the
    training data was prepared with, else shown as ids."""

    def __init__(self, path=None, data_name=None, log=print):
        from .pretrained import tokenizer_for_data
        from .tokenizer import load
        try:
            self.tokenizer = load(path) if path else tokenizer_for_data(data_name)
        except AnecyError as e:
            log(f"samples show token ids: {e}")
            self.tokenizer = None

    def __call__(self, model: Model, n_tokens: int = 48) -> str:
        return training_sample(model, self.tokenizer, n_tokens)
