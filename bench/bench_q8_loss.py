"""What decoding from int8 weights (--dtype q8) costs in accuracy, and gains in speed.

    python bench/bench_q8_loss.py --ckpt stories.ckpt [--data val.bin] [--tokens 2048]
                                  [--threads 2] [--quick]

(from the repo root with anecy installed, or with PYTHONPATH=. after an in-place build)

The model (an anecy checkpoint, a llama2.c .bin or an HF directory) reads windows of its
context (seq_len tokens) of held-out tokens (a token file; default: the built-in corpus's
stories for another seed than training's) one token per step from an empty cache, every
position through the decoding path, once with fp32 weights and once with their q8 copies.
It prints the mean next-token loss of each, their difference, how often the two agree on
the most likely token, and the tokens/s of each pass.
--quick: a tiny random model (the smoke run CI makes).
"""
import argparse
import time

import numpy as np

from anecy import Model, ModelConfig
from anecy.generate import Decoder


def mean_loss(model, windows, dtype, threads):
    """(mean next-token loss, argmax ids, tokens/s) decoding each window [n_windows, S+1]
    from an empty cache, one token per step."""
    decoder = Decoder(model, max_len=windows.shape[1] - 1, threads=threads, dtype=dtype)
    losses, picks = [], []
    t0 = time.perf_counter()
    for window in windows.tolist():
        decoder.reset()
        for i in range(len(window) - 1):
            logits = decoder.step([window[i]]).astype(np.float64)
            top = logits.max()
            log_total = top + np.log(np.exp(logits - top).sum())
            losses.append(log_total - logits[window[i + 1]])
            picks.append(int(np.argmax(logits)))
    rate = len(losses) / (time.perf_counter() - t0)
    return float(np.mean(losses)), np.array(picks), rate


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", metavar="PATH", help="the model (checkpoint, .bin or HF dir)")
    ap.add_argument("--data", metavar="PATH", help="held-out token file")
    ap.add_argument("--tokens", type=int, default=2048, help="positions scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny random model (smoke run)")
    args = ap.parse_args()
    if args.quick:
        model, args.tokens, what = Model(ModelConfig.preset("tiny"), seed=0), 48, "tiny random"
    elif not args.ckpt:
        ap.error("--ckpt is required (or --quick)")
    else:
        from anecy.pretrained import inspect, load
        source = inspect(args.ckpt)
        model, what = load(source), source.describe
    # windows of the model's context (its seq_len) and the token after each, as anecy eval
    S = model.config.seq_len
    n_windows = max(1, args.tokens // S)
    if args.data:
        from anecy.data import open_tokens
        tokens = open_tokens(args.data, model.config.vocab_size, S)
    else:
        from anecy.corpus import builtin_tokens
        tokens = builtin_tokens(n_windows * S + 1, seed=12345)
    n_windows = min(n_windows, (len(tokens) - 1) // S)
    windows = np.stack([np.asarray(tokens[w * S:(w + 1) * S + 1], np.int64)
                        for w in range(n_windows)])
    f32, f32_picks, f32_rate = mean_loss(model, windows, "f32", args.threads)
    q8, q8_picks, q8_rate = mean_loss(model, windows, "q8", args.threads)
    print(f"{what}: {n_windows} held-out windows of {S} tokens, {args.threads} threads")
    print(f"  f32 loss {f32:.4f}   {f32_rate:7.1f} tokens/s")
    print(f"  q8  loss {q8:.4f}   {q8_rate:7.1f} tokens/s")
    print(f"  q8 - f32: {q8 - f32:+.4f} nats/token ({100 * (q8 - f32) / f32:+.2f}%), "
          f"same most likely token at {100 * np.mean(f32_picks == q8_picks):.1f}% of positions")


if __name__ == "__main__":
    main()
