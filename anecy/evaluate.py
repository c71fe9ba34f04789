"""Scoring a model on held-out tokens: mean cross-entropy and perplexity over a token file.

The loss of a position is log-sum-exp of its logits minus the target's logit, with the row's
maximum subtracted first (a stable log-softmax), so it is the same number whatever the
logits' scale. ``anecy eval`` scores every non-overlapping window of
``seq_len + 1`` tokens (inputs and their next tokens) over the full vocabulary."""

import math
import time

import numpy as np

from .model import Model


def token_losses(logits, targets) -> np.ndarray:
    """Cross-entropy [S] (float64) of each position: logits [S, V], targets [S] (column
    indices). exp runs in float32 on logits minus their row's maximum (all <= 0, so nothing
    overflows) and is summed in float64: half the memory traffic of a float64 pass over a
    [S, V] array, at float32's 1e-7 relative error per term."""
    logits = np.asarray(logits, np.float32)
    targets = np.asarray(targets, np.int64)
    mx = logits.max(axis=1, keepdims=True)
    shifted = logits - mx
    np.exp(shifted, out=shifted)
    lse = np.log(shifted.sum(axis=1, dtype=np.float64)) + mx[:, 0].astype(np.float64)
    return lse - logits[np.arange(len(targets)), targets].astype(np.float64)


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
            total += float(token_losses(model.logits(window[:-1]), window[1:]).sum())
            bar.update(S)
            bar.set_postfix(loss=f"{total / ((w + 1) * S):.4f}", refresh=False)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    loss = total / (n * S)
    return {"loss": loss, "perplexity": math.exp(min(loss, 709.0)), "windows": n,
            "seq_len": S, "tokens": n * S, "seconds": seconds,
            "tokens_per_s": n * S / max(seconds, 1e-9)}
