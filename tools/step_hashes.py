"""Hashes of training steps, to show that a refactor of the engine changes no bit.

For six tiny random models (MHA, GQA, untied embeddings, Qwen3-style QK-norm with half
RoPE, head_dim != dim / n_heads, an odd seq_len) on the cpu and sim backends, runs a few
forward_backward steps, each followed by an AdamW update (Engine.adamw), and prints the
sha256 of every loss, the gradients, the updated parameters and the final logits. A few
variants cover the other paths of the step: weight gradients on the other thread than the
backend's default (async_dw), a compacted vocabulary, the sim backend with its fp16
pass-throughs off.

    python tools/step_hashes.py > before.txt   # ... change the engine, rebuild ...
    python tools/step_hashes.py | diff before.txt -
"""
import hashlib
import sys

import numpy as np

from anecy import Model, ModelConfig

SETUPS = {
    "mha": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, vocab_size=97, seq_len=32),
    "gqa": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=24,
                vocab_size=97, seq_len=32, residual_scale=0.5),
    "untied": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=97,
                   seq_len=23, tie_embeddings=False),
    "qwen3": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                  vocab_size=97, seq_len=32, qk_norm=True, rope_style="half", rope_theta=1e6,
                  norm_eps=1e-6),
    "headdim": dict(dim=40, hidden_dim=72, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=24,
                    vocab_size=53, seq_len=30, rope_style="half", tie_embeddings=False,
                    rope_theta=500.0),
    "odd": dict(dim=37, hidden_dim=71, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=14,
                vocab_size=97, seq_len=19, qk_norm=True),
}
STEPS = 3
LOSS_SCALE = {"cpu": 1.0, "sim": 4096.0}


def sha(a) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()[:24]


def run(name, backend, async_dw=None, compact=False, passthrough=True):
    cfg = ModelConfig(**SETUPS[name])
    m = Model(cfg, backend=backend, seed=3, async_dw=async_dw)
    if backend == "sim":
        m.engine.kernels.passthrough = passthrough
    rng = np.random.default_rng(cfg.seq_len)
    active = None
    if compact:
        active = np.arange(0, cfg.vocab_size, 2)
        m.set_active_vocab(active)
    adam_m, adam_v = np.zeros_like(m.params), np.zeros_like(m.params)
    tag = f"{name:8s} {backend} async_dw={m.engine.async_dw:d} compact={compact:d} " \
          f"passthrough={passthrough:d}"
    scale = LOSS_SCALE[backend]
    for step in range(1, STEPS + 1):
        x = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
        y = rng.integers(0, cfg.vocab_size if active is None else active.size,
                         cfg.seq_len).astype(np.int32)
        loss = m.forward_backward(x, y, scale)
        grads = {n: sha(v) for n, v in m.grad_views.items()}
        print(f"{tag} step {step} loss {loss!r} grads {sha(m.grads)}")
        for n, h in grads.items():
            print(f"{tag} step {step}   grad {n} {h}")
        m.engine.adamw(m.params, m.grads, adam_m, adam_v, m.n_decay, 1e-3, 0.9, 0.95, 1e-8,
                       0.1, step, 1.0 / scale)
        m.weights_changed()
        print(f"{tag} step {step} params {sha(m.params)}")
    x = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
    print(f"{tag} logits {sha(m.logits(x))}")


def main():
    for name in SETUPS:
        for backend in ("cpu", "sim"):
            run(name, backend)
    run("gqa", "cpu", async_dw=True)
    run("qwen3", "sim", async_dw=False)
    run("odd", "cpu", compact=True)
    run("gqa", "sim", passthrough=False)
    run("odd", "sim", passthrough=False)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
