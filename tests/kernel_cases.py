"""The ten kernels' test cases, shared by the tests of the layout table
(test_kernel_layout.py) and of the programs (test_mil.py): small configurations, random
inputs of realistic scale, and a plain numpy (float64) statement of each kernel's semantics."""

import numpy as np

from anecy.config import ModelConfig

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
