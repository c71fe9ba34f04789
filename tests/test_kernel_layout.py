"""The layout contract (anecy.kernel_layout): the kernel table resolved for each
configuration, packing and staging, and the RoPE tables in the programs' layout."""

import numpy as np
import pytest

from anecy import kernel_layout as kl
from anecy import mil
from anecy._ops import rope_tables
from kernel_cases import CONFIGS, inputs, make_cfg

# ------------------------------------------------------------------------------------------
# RoPE tables
# ------------------------------------------------------------------------------------------

def test_rope_tables_are_the_cpu_tables_per_head():
    # the values are the cpu backend's tables (checked against float64 in test_ops.py),
    # rounded to fp16; here only their per-head layout and signs are checked
    cfg = make_cfg("qwen3")
    cos, sin = kl.rope_tables(cfg)
    hd, S = cfg.head_dim, cfg.seq_len
    cos32, sin32 = rope_tables(hd, S, cfg.rope_theta)
    assert cos.shape == sin.shape == (hd, S) and cos.dtype == np.float16
    # half: pair i is rows (i, i + hd/2); the sine table is signed -sin, +sin
    assert np.array_equal(cos[:hd // 2], cos32.astype(np.float16))
    assert np.array_equal(cos[hd // 2:], cos32.astype(np.float16))
    assert np.array_equal(sin[:hd // 2], (-sin32).astype(np.float16))
    assert np.array_equal(sin[hd // 2:], sin32.astype(np.float16))
    cfg = make_cfg("mha")
    cos, sin = kl.rope_tables(cfg)
    assert np.array_equal(cos[0::2], cos[1::2])
    assert np.array_equal(sin[0::2], -sin[1::2])


# ------------------------------------------------------------------------------------------
# the table, packing and staging
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_table_shapes(cfg_name):
    cfg = make_cfg(cfg_name)
    D, H, Q, K, S = cfg.dim, cfg.hidden_dim, cfg.q_dim, cfg.kv_dim, cfg.seq_len
    P = cfg.n_heads * S
    extra = 0
    if cfg.qk_norm:
        extra = 32        # q_norm + k_norm columns padded to 32
    assert kl.input_shape("sdpaFwd", cfg) == (1, D, 1, S + Q + 2 * K + extra)
    pre = Q + K if cfg.qk_norm else 0       # pre-norm q and k for the QK-norm backward
    assert kl.output_shape("sdpaFwd", cfg) == (1, 2 * Q + 2 * K + pre, 1, S)
    expect = {
        "woFwd": ((1, Q, 1, S + D), (1, D, 1, S)),
        "ffnFused": ((1, D, 1, 2 * S + 3 * H), (1, D + 3 * H, 1, S)),
        "ffnBwdW2t": ((1, D, 1, S + H), (1, H, 1, S)),
        "ffnBwdW13t": ((1, H, 1, 2 * S + 2 * D), (1, D, 1, S)),
        "wotBwd": ((1, D, 1, S + Q), (1, Q, 1, S)),
        "sdpaBwd1": ((1, 4 * Q, 1, S), (1, Q + 2 * P, 1, S)),
        "sdpaBwd2": ((1, 2 * P + 2 * Q, 1, S), (1, 2 * Q, 1, S)),
        "qBwd": ((1, Q, 1, S + D), (1, D, 1, S)),
        "kvBwd": ((1, K, 1, 2 * S + 2 * D), (1, D, 1, S)),
    }
    for k, (i, o) in expect.items():
        assert kl.input_shape(k, cfg) == i, k
        assert kl.output_shape(k, cfg) == o, k
        prog = mil.generate(k, cfg)
        assert (prog.input_shape, prog.output_shape) == (i, o)
    assert kl.column_offsets("sdpaFwd", cfg)["Wk"] == (S + Q, K)
    assert kl.output_offsets("ffnFused", cfg)["gate"] == (D + 2 * H, H)
    assert kl.input_channel_offsets("sdpaBwd2", cfg)["k_rep"] == (2 * P + Q, Q)
    assert kl.output_offsets("sdpaBwd1", cfg)["dprobs"] == (P, P)
    assert kl.output_offsets("sdpaBwd1", cfg)["dv_rep"] == (2 * P, Q)
    # the rows that let one Surface be sdpaBwd1's output and sdpaBwd2's input
    for n in ("probs", "dprobs"):
        assert kl.output_offsets("sdpaBwd1", cfg)[n] == \
            kl.input_channel_offsets("sdpaBwd2", cfg)[n]


def test_every_kernel_block_is_described():
    for k, spec in kl.KERNELS.items():
        assert spec.packing in ("columns", "channels")
        for b in spec.inputs:
            assert b.kind in ("act", "weight", "pad") and b.holds
            assert b.place in ("as_is", "T", "vec")
        for o in spec.outputs:
            assert o.holds


def test_layout_follows_design_table():
    """Build inputs by hand as docs/ARCHITECTURE.md, section 4 (The ten kernels) lays them
    out and compare."""
    cfg = make_cfg("qwen3")
    D, Q, K, S, hd = cfg.dim, cfg.q_dim, cfg.kv_dim, cfg.seq_len, cfg.head_dim
    a = inputs("sdpaFwd", cfg)
    hand = np.zeros((D, S + Q + 2 * K + 32), np.float32)
    for c in range(D):
        hand[c, :S] = a["xnorm"][c]
        hand[c, S:S + Q] = a["Wq"][:, c]
        hand[c, S + Q:S + Q + K] = a["Wk"][:, c]
        hand[c, S + Q + K:S + Q + 2 * K] = a["Wv"][:, c]
    hand[:hd, S + Q + 2 * K] = a["q_norm"]          # one column each, head_dim <= D
    hand[:hd, S + Q + 2 * K + 1] = a["k_norm"]
    assert np.array_equal(kl.pack_input("sdpaFwd", cfg, **a), hand.astype(np.float16))

    a = inputs("ffnFused", cfg)
    hand = np.concatenate([a["x2norm"], a["x2"], a["W1"].T, a["W3"].T, a["W2"]], axis=1)
    assert np.array_equal(kl.pack_input("ffnFused", cfg, **a), hand.astype(np.float16))
    a = inputs("ffnBwdW13t", cfg)
    hand = np.concatenate([a["dh1"], a["dh3"], a["W1"], a["W3"]], axis=1)
    assert np.array_equal(kl.pack_input("ffnBwdW13t", cfg, **a), hand.astype(np.float16))
    a = inputs("woFwd", cfg)
    hand = np.concatenate([a["attn"], a["Wo"].T], axis=1)
    assert np.array_equal(kl.pack_input("woFwd", cfg, **a), hand.astype(np.float16))
    a = inputs("sdpaBwd2", cfg)
    hand = np.concatenate([a["probs"], a["dprobs"], a["q"], a["k_rep"]], axis=0)
    assert np.array_equal(kl.pack_input("sdpaBwd2", cfg, **a), hand.astype(np.float16))


@pytest.mark.parametrize("kernel", kl.KERNEL_NAMES)
def test_pack_unpack_and_staging(kernel):
    cfg = make_cfg("qwen3")
    a = inputs(kernel, cfg, seed=3)
    packed = kl.pack_input(kernel, cfg, **a)
    lay = kl.layout(kernel, cfg)
    assert packed.dtype == np.float16 and packed.shape == lay.in_shape[1::2]

    # staging weights then writing activations, into a dirty buffer, equals packing at once
    buf = np.full(lay.in_shape[1::2], 7, np.float16)
    weights = {b.name: a[b.name] for b in lay.inputs if b.kind == "weight"}
    acts = {b.name: a[b.name] for b in lay.inputs if b.kind == "act"}
    assert set(weights) | set(acts) == set(a)
    kl.stage_weights(kernel, cfg, buf, **weights)
    kl.write_activations(kernel, cfg, buf, **acts)
    assert np.array_equal(buf, packed)
    # a new microstep rewrites only the activation columns
    acts2 = {k: v + 1 for k, v in acts.items()}
    kl.write_activations(kernel, cfg, buf, **acts2)
    assert np.array_equal(buf, kl.pack_input(kernel, cfg, **weights, **acts2))

    # every block reads back (the output of a kernel unpacks the same way)
    for b in lay.inputs:
        blk = packed[b.row0:b.row0 + b.rows, b.col0:b.col0 + b.cols].astype(np.float32)
        if b.kind == "pad":
            assert not blk.any()
            continue
        want = np.asarray(a[b.name]).astype(np.float16).astype(np.float32)
        if b.place == "T":
            want = want.T
        elif b.place == "vec":
            want = want.reshape(b.rows, b.cols)
        assert np.array_equal(blk, want), b.name

    # unpack_output splits channel blocks in table order, as fp32
    _, C, _, S = lay.out_shape
    out = (np.arange(C * S) % 2048 - 1024).astype(np.float16).reshape(1, C, 1, S)
    parts = kl.unpack_output(kernel, cfg, out)
    assert [n for n, _, _ in lay.outputs] == list(parts)
    assert all(p.dtype == np.float32 for p in parts.values())
    assert np.array_equal(np.concatenate(list(parts.values()), axis=0), out.reshape(C, S))


def test_pack_rejects_bad_arrays():
    cfg = make_cfg("gqa")
    a = inputs("woFwd", cfg)
    with pytest.raises(ValueError):
        kl.pack_input("woFwd", cfg, attn=a["attn"], Wo=a["Wo"].T)      # wrong orientation
    with pytest.raises(ValueError):
        kl.pack_input("woFwd", cfg, attn=a["attn"])                     # missing weight
    buf = kl.new_input_buffer("woFwd", cfg)
    with pytest.raises(ValueError):
        kl.stage_weights("woFwd", cfg, buf, Wo=a["Wo"], attn=a["attn"])  # an activation
    with pytest.raises(ValueError):
        kl.write_activations("woFwd", cfg, buf.astype(np.float32), attn=a["attn"])
    with pytest.raises(KeyError):
        kl.layout("nope", cfg)
