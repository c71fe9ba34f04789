"""Scoring a model on held-out tokens: mean cross-entropy and perplexity over a token file,
or over the scored tokens of an examples file (``evaluate_examples``).

``anecy eval`` scores every non-overlapping window of ``seq_len + 1`` tokens (inputs and
their next tokens) over the full vocabulary, with the engine's own cross-entropy
(``Model.loss``, the forward pass and stable log-softmax of training, without a gradient)."""

import math
import time

import numpy as np

from .model import Model


def windows(n_tokens: int, seq_len: int, max_windows=None) -> int:
    """How many non-overlapping windows of seq_len + 1 tokens a file of n_tokens holds (each
    window's last token is the next one's first), at most max_windows."""
    n = (n_tokens - 1) // seq_len
    return n if max_windows is None else min(n, max_windows)


def evaluate(model: Model, tokens, max_windows=None, progress: bool = False) -> dict:
    """Mean loss, perplexity and speed of ``model`` over ``tokens`` (a token file's ids), window
    by window, over the full vocabulary (a compacted model is restored to it)."""
    from tqdm import tqdm
    model.set_active_vocab(None)
    S = model.config.seq_len
    n = windows(len(tokens), S, max_windows)
    total, start = 0.0, time.perf_counter()
    bar = tqdm(total=n * S, disable=not progress, unit="tok", unit_scale=True,
               dynamic_ncols=True)
    try:
        for w in range(n):
            window = np.asarray(tokens[w * S:w * S + S + 1], np.int64)
            total += model.loss(window[:-1], window[1:]) * S   # every window has S targets
            bar.update(S)
            bar.set_postfix(loss=f"{total / ((w + 1) * S):.4f}", refresh=False)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    loss = total / (n * S)
    return {"loss": loss, "perplexity": math.exp(min(loss, 709.0)), "windows": n,
            "seq_len": S, "tokens": n * S, "seconds": seconds,
            "tokens_per_s": n * S / max(seconds, 1e-9)}


def evaluate_examples(model: Model, examples, max_windows=None, progress: bool = False) -> dict:
    """evaluate()'s figures over an examples file (``data.Examples``): the mean loss over its
    scored tokens, one example a window at positions 0.. (what every backend computes alike),
    over the full vocabulary. ``max_windows`` limits the examples scored."""
    from tqdm import tqdm

    from .errors import DataError
    model.set_active_vocab(None)
    S = model.config.seq_len
    n = len(examples) if max_windows is None else min(len(examples), max_windows)
    longest = int(np.max(examples.lengths[:n])) if n else 0
    if longest > S + 1:
        raise DataError(f"an example of {longest} tokens does not fit a window of {S} "
                        f"(--seq-len {longest - 1} or more)")
    x, y = np.zeros(S, np.int64), np.zeros(S, np.int64)
    weights = np.zeros(S, np.float32)
    total, scored, start = 0.0, 0, time.perf_counter()
    bar = tqdm(total=n, disable=not progress, unit="ex", dynamic_ncols=True)
    try:
        for k in range(n):
            ids, mask = examples[k]
            m = len(ids) - 1               # predictions: token t+1 from tokens 0..t
            x[:], y[:], weights[:] = 0, 0, 0.0
            x[:m], y[:m], weights[:m] = ids[:-1], ids[1:], mask[1:]
            total += model.loss(x, y, weights=weights)   # the sum over the scored positions
            scored += int(np.count_nonzero(mask[1:]))
            bar.update(1)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    loss = total / max(scored, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 709.0)), "windows": n,
            "seq_len": S, "tokens": scored, "seconds": seconds,
            "tokens_per_s": scored / max(seconds, 1e-9)}
