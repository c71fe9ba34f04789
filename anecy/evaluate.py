"""Scoring a model on held-out tokens: mean cross-entropy and perplexity over a token file.

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
