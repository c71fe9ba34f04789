"""The kernel table, packing, blobs, and each generated kernel run through the simulator
against a plain numpy (float64) statement of its semantics."""

import struct

import numpy as np
import pytest

from anecy import mil
from anecy._ops import rope_tables
from anecy.config import ModelConfig
from anecy.milsim import run
from fp16_bounds import TOLERANCE, U, max_rel_err

# ------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------

MHA_TINY = dict(dim=64, hidden_dim=96, n_layers=1, n_heads=4, vocab_size=32, seq_len=32)
# GQA with head_dim != dim / n_heads, and a residual scale as the seeds' runs use
GQA_TINY = dict(dim=64, hidden_dim=96, n_layers=1, n_heads=8, n_kv_heads=2, head_dim=24,
                vocab_size=32, seq_len=32, residual_scale=0.5)
QWEN3_TINY = dict(dim=64, hidden_dim=96, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32,
                  vocab_size=32, seq_len=32, qk_norm=True, rope_style="half",
                  rope_theta=1e6, norm_eps=1e-6)
# short odd sequence, 3 query heads sharing one kv head, QK-norm with interleaved RoPE
ODD_TINY = dict(dim=20, hidden_dim=40, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=6,
                vocab_size=8, seq_len=5, qk_norm=True, rope_style="interleaved",
                residual_scale=0.3)
CONFIGS = {"mha": MHA_TINY, "gqa": GQA_TINY, "qwen3": QWEN3_TINY, "odd": ODD_TINY}


def make_cfg(name):
    return ModelConfig(**CONFIGS[name])


# ------------------------------------------------------------------------------------------
# reference semantics (float64, written from the specification, not from anecy.mil)
# ------------------------------------------------------------------------------------------

def ref_rms_heads(x, w, n, hd, eps):
    xh = x.reshape(n, hd, -1)
    rms = np.sqrt(np.mean(xh * xh, axis=1, keepdims=True) + eps)
    return (xh / rms * w[None, :, None]).reshape(n * hd, -1)


def ref_rope(x, cfg, n):
    hd, S = cfg.head_dim, x.shape[1]
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2) / hd))
    ang = inv_freq[:, None] * np.arange(S)[None, :]                  # [hd/2, S]
    cos, sin = np.cos(ang), np.sin(ang)
    xh = x.reshape(n, hd, S)
    out = np.empty_like(xh)
    if cfg.rope_style == "interleaved":
        i0, i1 = np.arange(0, hd, 2), np.arange(1, hd, 2)
    else:
        i0, i1 = np.arange(hd // 2), np.arange(hd // 2, hd)
    x0, x1 = xh[:, i0], xh[:, i1]
    out[:, i0] = x0 * cos - x1 * sin
    out[:, i1] = x0 * sin + x1 * cos
    return out.reshape(n * hd, S)


def ref_probs(q, k_rep, cfg):
    """[n_heads, S, S] causal softmax of scale * q_h^T k_h."""
    nh, hd, S = cfg.n_heads, cfg.head_dim, q.shape[1]
    qh, kh = q.reshape(nh, hd, S), k_rep.reshape(nh, hd, S)
    s = np.einsum("hci,hcj->hij", qh, kh) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((S, S), bool))[None], s, -np.inf)
    e = np.exp(s - s.max(axis=2, keepdims=True))
    return e / e.sum(axis=2, keepdims=True)


def ref_repeat_kv(x, cfg):
    hd = cfg.head_dim
    r = cfg.n_heads // cfg.n_kv_heads
    heads = [x[(h // r) * hd:(h // r + 1) * hd] for h in range(cfg.n_heads)]
    return np.concatenate(heads, axis=0)


def ref_sdpaFwd(cfg, xnorm, Wq, Wk, Wv, q_norm=None, k_norm=None):
    q, k, v = Wq @ xnorm, Wk @ xnorm, Wv @ xnorm
    out = {"v": v}
    if cfg.qk_norm:
        out["q_pre"], out["k_pre"] = q, k
        q = ref_rms_heads(q, q_norm, cfg.n_heads, cfg.head_dim, cfg.norm_eps)
        k = ref_rms_heads(k, k_norm, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps)
    q, k = ref_rope(q, cfg, cfg.n_heads), ref_rope(k, cfg, cfg.n_kv_heads)
    p = ref_probs(q, ref_repeat_kv(k, cfg), cfg)
    vr = ref_repeat_kv(v, cfg).reshape(cfg.n_heads, cfg.head_dim, -1)
    out["attn"] = np.einsum("hcj,hij->hci", vr, p).reshape(cfg.q_dim, -1)
    out["q_rope"], out["k_rope"] = q, k
    return out


def silu(x):
    return x / (1.0 + np.exp(-x))


def ref_sdpaBwd1(cfg, q, k_rep, v_rep, da):
    nh, hd, S = cfg.n_heads, cfg.head_dim, q.shape[1]
    p = ref_probs(q, k_rep, cfg)
    dah, vh = da.reshape(nh, hd, S), v_rep.reshape(nh, hd, S)
    dp = np.einsum("hci,hcj->hij", dah, vh)
    dv = np.einsum("hij,hci->hcj", p, dah)
    return {"dv_rep": dv.reshape(nh * hd, S), "probs": p.reshape(nh * S, S),
            "dprobs": dp.reshape(nh * S, S)}


def ref_sdpaBwd2(cfg, probs, dprobs, q, k_rep):
    nh, hd, S = cfg.n_heads, cfg.head_dim, q.shape[1]
    p, dp = probs.reshape(nh, S, S), dprobs.reshape(nh, S, S)
    ds = p * (dp - np.sum(p * dp, axis=2, keepdims=True))
    scale = 1.0 / np.sqrt(hd)
    qh, kh = q.reshape(nh, hd, S), k_rep.reshape(nh, hd, S)
    dq = scale * np.einsum("hij,hcj->hci", ds, kh)
    dk = scale * np.einsum("hij,hci->hcj", ds, qh)
    return {"dq": dq.reshape(nh * hd, S), "dk_rep": dk.reshape(nh * hd, S)}


def reference(kernel, cfg, a):
    a = {k: np.asarray(v, np.float64) for k, v in a.items()}
    if kernel == "sdpaFwd":
        return ref_sdpaFwd(cfg, **a)
    if kernel == "woFwd":
        return {"o": a["Wo"] @ a["attn"]}
    if kernel == "ffnFused":
        h1, h3 = a["W1"] @ a["x2norm"], a["W3"] @ a["x2norm"]
        gate = silu(h1) * h3
        return {"x_next": a["x2"] + cfg.residual_scale * (a["W2"] @ gate),
                "h1": h1, "h3": h3, "gate": gate}
    if kernel == "ffnBwdW2t":
        return {"dgate": a["W2"].T @ a["dffn"]}
    if kernel == "ffnBwdW13t":
        return {"dx": a["W1"].T @ a["dh1"] + a["W3"].T @ a["dh3"]}
    if kernel == "wotBwd":
        return {"da": a["Wo"].T @ a["dy"]}
    if kernel == "sdpaBwd1":
        return ref_sdpaBwd1(cfg, **a)
    if kernel == "sdpaBwd2":
        return ref_sdpaBwd2(cfg, **a)
    if kernel == "qBwd":
        return {"dx": a["Wq"].T @ a["dq"]}
    if kernel == "kvBwd":
        return {"dx": a["Wk"].T @ a["dk"] + a["Wv"].T @ a["dv"]}
    raise KeyError(kernel)


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------

def inputs(kernel, cfg, seed=0):
    """Random fp32 inputs of realistic scale: activations ~ N(0, 1), weights ~ N(0, 1/in),
    so every projection is O(1)."""
    rng = np.random.default_rng(seed)
    D, H, Q, K, S = cfg.dim, cfg.hidden_dim, cfg.q_dim, cfg.kv_dim, cfg.seq_len

    def act(c):
        return rng.standard_normal((c, S)).astype(np.float32)

    def weight(o, i, gain=1.0):
        return (gain * rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32)

    if kernel == "sdpaFwd":
        # gain 2 on q and k makes the attention clearly non-uniform
        a = dict(xnorm=act(D), Wq=weight(Q, D, 2.0), Wk=weight(K, D, 2.0), Wv=weight(K, D))
        if cfg.qk_norm:
            a["q_norm"] = (1 + 0.3 * rng.standard_normal(cfg.head_dim)).astype(np.float32)
            a["k_norm"] = (1 + 0.3 * rng.standard_normal(cfg.head_dim)).astype(np.float32)
        return a
    if kernel == "woFwd":
        return dict(attn=act(Q), Wo=weight(D, Q))
    if kernel == "ffnFused":
        return dict(x2norm=act(D), x2=act(D), W1=weight(H, D), W3=weight(H, D), W2=weight(D, H))
    if kernel == "ffnBwdW2t":
        return dict(dffn=act(D), W2=weight(D, H))
    if kernel == "ffnBwdW13t":
        return dict(dh1=act(H), dh3=act(H), W1=weight(H, D), W3=weight(H, D))
    if kernel == "wotBwd":
        return dict(dy=act(D), Wo=weight(D, Q))
    if kernel == "sdpaBwd1":
        kv = act(K), act(K)
        return dict(q=2 * act(Q), k_rep=ref_repeat_kv(2 * kv[0], cfg).astype(np.float32),
                    v_rep=ref_repeat_kv(kv[1], cfg).astype(np.float32), da=act(Q))
    if kernel == "sdpaBwd2":
        # Unit gain here: with nearly one-hot rows, dprobs - rowsum(probs*dprobs) cancels
        # to a tiny true gradient that fp16 can only resolve to U * |dprobs| (see TOLERANCE).
        q = act(Q)
        k_rep = ref_repeat_kv(act(K), cfg).astype(np.float32)
        probs = ref_probs(q.astype(np.float64), k_rep.astype(np.float64), cfg)
        return dict(probs=probs.reshape(-1, S).astype(np.float32),
                    dprobs=(2 * act(cfg.n_heads * S)).astype(np.float32), q=q, k_rep=k_rep)
    if kernel == "qBwd":
        return dict(dq=act(Q), Wq=weight(Q, D))
    if kernel == "kvBwd":
        return dict(dk=act(K), dv=act(K), Wk=weight(K, D), Wv=weight(K, D))
    raise KeyError(kernel)


# ------------------------------------------------------------------------------------------
# kernels against the reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("kernel", mil.KERNEL_NAMES)
def test_kernel_matches_reference(kernel, cfg_name):
    cfg = make_cfg(cfg_name)
    a = inputs(kernel, cfg)
    prog = mil.generate(kernel, cfg)
    out = run(prog, mil.pack_input(kernel, cfg, **a))
    assert out.dtype == np.float16 and out.shape == mil.output_shape(kernel, cfg)
    got = mil.unpack_output(kernel, cfg, out)
    want = reference(kernel, cfg, a)
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        err = max_rel_err(got[name], ref)
        assert err <= TOLERANCE[kernel], (kernel, cfg_name, name, err / U)


def test_causal_probs_are_exactly_zero_above_the_diagonal():
    cfg = make_cfg("gqa")
    a = inputs("sdpaBwd1", cfg)
    got = mil.unpack_output("sdpaBwd1", cfg, run(mil.generate("sdpaBwd1", cfg),
                                                    mil.pack_input("sdpaBwd1", cfg, **a)))
    S = cfg.seq_len
    p = got["probs"].reshape(cfg.n_heads, S, S)
    assert np.all(p[:, np.triu_indices(S, 1)[0], np.triu_indices(S, 1)[1]] == 0)
    assert np.allclose(p.sum(axis=2), 1, atol=8 * U)


def test_gqa_uses_hf_head_mapping():
    """Query heads 0..r-1 read kv head 0: give kv head 0 and 1 different values and
    check each query head's output against the kv head HF's repeat_kv assigns it."""
    cfg = make_cfg("gqa")
    a = inputs("sdpaFwd", cfg)
    hd, r = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    a["Wv"][:] = 0
    for g in range(cfg.n_kv_heads):      # v of kv head g is constant g + 1
        a["Wv"][g * hd:(g + 1) * hd, 0] = g + 1
    a["xnorm"][0, :] = 1
    got = mil.unpack_output("sdpaFwd", cfg, run(mil.generate("sdpaFwd", cfg),
                                                   mil.pack_input("sdpaFwd", cfg, **a)))
    for h in range(cfg.n_heads):
        assert np.allclose(got["attn"][h * hd:(h + 1) * hd], h // r + 1, atol=4 * U)


# ------------------------------------------------------------------------------------------
# RoPE tables
# ------------------------------------------------------------------------------------------

def test_rope_tables_are_the_cpu_tables_per_head():
    # the values are the cpu backend's tables (checked against float64 in test_ops.py),
    # rounded to fp16; here only their per-head layout and signs are checked
    cfg = make_cfg("qwen3")
    cos, sin = mil.rope_tables(cfg)
    hd, S = cfg.head_dim, cfg.seq_len
    cos32, sin32 = rope_tables(hd, S, cfg.rope_theta)
    assert cos.shape == sin.shape == (hd, S) and cos.dtype == np.float16
    # half: pair i is rows (i, i + hd/2); the sine table is signed -sin, +sin
    assert np.array_equal(cos[:hd // 2], cos32.astype(np.float16))
    assert np.array_equal(cos[hd // 2:], cos32.astype(np.float16))
    assert np.array_equal(sin[:hd // 2], (-sin32).astype(np.float16))
    assert np.array_equal(sin[hd // 2:], sin32.astype(np.float16))
    cfg = make_cfg("mha")
    cos, sin = mil.rope_tables(cfg)
    assert np.array_equal(cos[0::2], cos[1::2])
    assert np.array_equal(sin[0::2], -sin[1::2])


# ------------------------------------------------------------------------------------------
# blobs
# ------------------------------------------------------------------------------------------

def expected_blob(values_f16):
    payload = np.asarray(values_f16, dtype="<f2").tobytes()
    header = (bytes([1, 0, 0, 0, 2]) + bytes(59)                       # bytes 0..63
              + bytes([0xEF, 0xBE, 0xAD, 0xDE, 1, 0, 0, 0])            # 64..71
              + struct.pack("<I", len(payload)) + bytes(4)             # 72..79
              + struct.pack("<I", 128) + bytes(44))                    # 80..127
    assert len(header) == 128
    return header + payload


def test_blob_writer_byte_for_byte():
    vals = np.array([[0.0, 1.0, -2.5], [65504.0, -0.0, 1e-7]], dtype=np.float32)
    got = mil.build_blob(vals)
    assert got == expected_blob(vals.astype(np.float16).ravel())
    assert len(got) == 128 + 12
    assert got[72:76] == b"\x0c\x00\x00\x00" and got[80:84] == b"\x80\x00\x00\x00"
    # payload is little-endian IEEE half: 1.0 = 0x3C00, -2.5 = 0xC100
    assert got[130:132] == b"\x00\x3c" and got[132:134] == b"\x00\xc1"


def test_blob_reader_round_trip_and_rejections():
    vals = np.arange(-8, 8, dtype=np.float16) / 4
    blob = mil.build_blob(vals)
    assert np.array_equal(mil.read_blob(blob), vals)
    bad = [blob[:100], b"\x00" + blob[1:], blob[:64] + b"\x00" + blob[65:],
           blob[:68] + b"\x02" + blob[69:], blob + b"\x00\x00", blob[:-2]]
    for b in bad:
        with pytest.raises(ValueError):
            mil.read_blob(b)


def test_mask_blob_in_program():
    cfg = make_cfg("mha")
    prog = mil.gen_sdpaBwd1(cfg)
    mask = mil.read_blob(prog.blobs["@model_path/weights/mask.bin"]).reshape(32, 32)
    assert np.all(mask[np.tril_indices(32)] == 0)
    assert np.all(mask[np.triu_indices(32, 1)] == mil.MASK_VALUE)


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
    assert mil.input_shape("sdpaFwd", cfg) == (1, D, 1, S + Q + 2 * K + extra)
    pre = Q + K if cfg.qk_norm else 0       # pre-norm q and k for the QK-norm backward
    assert mil.output_shape("sdpaFwd", cfg) == (1, 2 * Q + 2 * K + pre, 1, S)
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
        assert mil.input_shape(k, cfg) == i, k
        assert mil.output_shape(k, cfg) == o, k
        prog = mil.generate(k, cfg)
        assert (prog.input_shape, prog.output_shape) == (i, o)
    assert mil.column_offsets("sdpaFwd", cfg)["Wk"] == (S + Q, K)
    assert mil.output_offsets("ffnFused", cfg)["gate"] == (D + 2 * H, H)
    assert mil.input_channel_offsets("sdpaBwd2", cfg)["k_rep"] == (2 * P + Q, Q)
    assert mil.output_offsets("sdpaBwd1", cfg)["dprobs"] == (P, P)
    assert mil.output_offsets("sdpaBwd1", cfg)["dv_rep"] == (2 * P, Q)
    # the rows that let one Surface be sdpaBwd1's output and sdpaBwd2's input
    for n in ("probs", "dprobs"):
        assert mil.output_offsets("sdpaBwd1", cfg)[n] == \
            mil.input_channel_offsets("sdpaBwd2", cfg)[n]


def test_every_kernel_block_is_described():
    for k, spec in mil.KERNELS.items():
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
    assert np.array_equal(mil.pack_input("sdpaFwd", cfg, **a), hand.astype(np.float16))

    a = inputs("ffnFused", cfg)
    hand = np.concatenate([a["x2norm"], a["x2"], a["W1"].T, a["W3"].T, a["W2"]], axis=1)
    assert np.array_equal(mil.pack_input("ffnFused", cfg, **a), hand.astype(np.float16))
    a = inputs("ffnBwdW13t", cfg)
    hand = np.concatenate([a["dh1"], a["dh3"], a["W1"], a["W3"]], axis=1)
    assert np.array_equal(mil.pack_input("ffnBwdW13t", cfg, **a), hand.astype(np.float16))
    a = inputs("woFwd", cfg)
    hand = np.concatenate([a["attn"], a["Wo"].T], axis=1)
    assert np.array_equal(mil.pack_input("woFwd", cfg, **a), hand.astype(np.float16))
    a = inputs("sdpaBwd2", cfg)
    hand = np.concatenate([a["probs"], a["dprobs"], a["q"], a["k_rep"]], axis=0)
    assert np.array_equal(mil.pack_input("sdpaBwd2", cfg, **a), hand.astype(np.float16))


def test_qk_norm_weights_fold_when_head_dim_exceeds_dim():
    cfg = ModelConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2, head_dim=48, vocab_size=8,
                      seq_len=8, qk_norm=True, rope_style="half")
    blk = mil.layout("sdpaFwd", cfg).block("q_norm")
    assert (blk.rows, blk.cols) == (16, 3)        # smallest divisor k of 48 with 48/k <= 16
    a = inputs("sdpaFwd", cfg)
    got = mil.unpack_output("sdpaFwd", cfg, run(mil.generate("sdpaFwd", cfg),
                                                   mil.pack_input("sdpaFwd", cfg, **a)))
    want = reference("sdpaFwd", cfg, a)
    for name in want:
        assert max_rel_err(got[name], want[name]) <= TOLERANCE["sdpaFwd"], name


@pytest.mark.parametrize("kernel", mil.KERNEL_NAMES)
def test_pack_unpack_and_staging(kernel):
    cfg = make_cfg("qwen3")
    a = inputs(kernel, cfg, seed=3)
    packed = mil.pack_input(kernel, cfg, **a)
    lay = mil.layout(kernel, cfg)
    assert packed.dtype == np.float16 and packed.shape == lay.in_shape[1::2]

    # staging weights then writing activations, into a dirty buffer, equals packing at once
    buf = np.full(lay.in_shape[1::2], 7, np.float16)
    weights = {b.name: a[b.name] for b in lay.inputs if b.kind == "weight"}
    acts = {b.name: a[b.name] for b in lay.inputs if b.kind == "act"}
    assert set(weights) | set(acts) == set(a)
    mil.stage_weights(kernel, cfg, buf, **weights)
    mil.write_activations(kernel, cfg, buf, **acts)
    assert np.array_equal(buf, packed)
    # a new microstep rewrites only the activation columns
    acts2 = {k: v + 1 for k, v in acts.items()}
    mil.write_activations(kernel, cfg, buf, **acts2)
    assert np.array_equal(buf, mil.pack_input(kernel, cfg, **weights, **acts2))

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
    parts = mil.unpack_output(kernel, cfg, out)
    assert [n for n, _, _ in lay.outputs] == list(parts)
    assert all(p.dtype == np.float32 for p in parts.values())
    assert np.array_equal(np.concatenate(list(parts.values()), axis=0), out.reshape(C, S))


def test_pack_rejects_bad_arrays():
    cfg = make_cfg("gqa")
    a = inputs("woFwd", cfg)
    with pytest.raises(ValueError):
        mil.pack_input("woFwd", cfg, attn=a["attn"], Wo=a["Wo"].T)      # wrong orientation
    with pytest.raises(ValueError):
        mil.pack_input("woFwd", cfg, attn=a["attn"])                     # missing weight
    buf = mil.new_input_buffer("woFwd", cfg)
    with pytest.raises(ValueError):
        mil.stage_weights("woFwd", cfg, buf, Wo=a["Wo"], attn=a["attn"])  # an activation
    with pytest.raises(ValueError):
        mil.write_activations("woFwd", cfg, buf.astype(np.float32), attn=a["attn"])
    with pytest.raises(KeyError):
        mil.layout("nope", cfg)


def test_qk_norm_eps_must_survive_fp16():
    cfg = ModelConfig(**dict(QWEN3_TINY, norm_eps=1e-9))
    with pytest.raises(ValueError):
        mil.gen_sdpaFwd(cfg)
    # 1e-6 is an fp16 subnormal: kept, not flushed
    text = mil.gen_sdpaFwd(make_cfg("qwen3")).text
    assert "val=fp16(0.000001)" in text
