"""The numeric kernels of anecy._ops (through their py_* entry points in anecy._testing)
against plain numpy references written here, mostly in float64.

Layouts are channel-first [C, S] row-major float32. Sizes deliberately include ones
that are not multiples of any SIMD width (1, 3, 7, 17, 33, 65) next to typical ones.

Tolerances are stated where they are used. U is the float32 unit roundoff (2^-24);
most bounds are first-order worst-case error bounds of the float32 computation the
kernel performs, scaled by a small safety factor, measured against the float64 value
of the same quantity (or of its absolute-value "magnitude" twin, for sums that may
cancel).
"""
import itertools
import zlib

import numpy as np
import pytest
import torch

from anecy._ops import rope_tables
from anecy._testing import (
    py_adamw,
    py_attention_bwd,
    py_attention_fwd,
    py_embedding_bwd,
    py_embedding_fwd,
    py_gqa_reduce,
    py_gqa_repeat,
    py_rmsnorm_bwd,
    py_rmsnorm_fwd,
    py_rope,
    py_sgemm,
    py_softmax_xent,
    py_sumsq,
    py_swiglu_bwd,
    py_swiglu_fwd,
)

U = 2.0 ** -24  # float32 unit roundoff
TINY = 1e-30    # keeps "<=" bounds meaningful where the reference is exactly zero

ODD = [1, 3, 7, 17, 33, 65]


def f32(a):
    return np.ascontiguousarray(a, dtype=np.float32)


def rng_for(*key):
    """A generator seeded from the test's parameters (stable across runs, unlike hash())."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def randn(rng, *shape, scale=1.0):
    return f32(rng.standard_normal(shape) * scale)


def assert_within(got, want, bound, what=""):
    """|got - want| <= bound elementwise; report the worst offender."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = np.abs(got - want)
    bound = np.broadcast_to(np.asarray(bound, np.float64), err.shape)
    bad = err > bound
    i = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {err.size} out of bound; worst at {i}: "
                           f"got {got[i]!r}, want {want[i]!r}, err {err[i]:.3e} > "
                           f"bound {bound[i]:.3e}")


# ======================================================================================
# sgemm

SGEMM_SHAPES = [(1, 1, 1), (3, 7, 17), (33, 65, 7), (17, 1, 33), (1, 65, 3), (64, 128, 96),
                (65, 33, 129), (5, 4, 0)]


@pytest.mark.parametrize("trans_a,trans_b", list(itertools.product([False, True], repeat=2)),
                         ids=["NN", "NT", "TN", "TT"])
@pytest.mark.parametrize("M,N,K", SGEMM_SHAPES, ids=[f"{m}x{n}x{k}" for m, n, k in SGEMM_SHAPES])
@pytest.mark.parametrize("alpha", [1.0, -0.37])
def test_sgemm(trans_a, trans_b, M, N, K, alpha):
    rng = rng_for("sgemm", trans_a, trans_b, M, N, K)
    opA = randn(rng, M, K)
    opB = randn(rng, K, N)
    A = f32(opA.T) if trans_a else opA
    B = f32(opB.T) if trans_b else opB
    if alpha == 1.0:  # the default
        got = py_sgemm(trans_a, trans_b, A, B)
    else:
        got = py_sgemm(trans_a, trans_b, A, B, alpha)
    assert got.shape == (M, N) and got.dtype == np.float32
    a32 = np.float64(np.float32(alpha))
    want = a32 * (opA.astype(np.float64) @ opB.astype(np.float64))
    # fp32 accumulation over K terms: |err| <= ~K*U*(|A| @ |B|) (plus alpha's own rounding)
    mag = abs(a32) * (np.abs(opA).astype(np.float64) @ np.abs(opB).astype(np.float64))
    assert_within(got, want, 2 * (K + 2) * U * mag + TINY, "sgemm")


def test_sgemm_rejects_mismatched_inner_dimension():
    A = np.ones((3, 4), np.float32)
    B = np.ones((5, 2), np.float32)
    with pytest.raises(ValueError):
        py_sgemm(False, False, A, B)
    with pytest.raises(ValueError):
        py_sgemm(True, True, A, B)  # op(A) is [4, 3], op(B) is [2, 5]


# ======================================================================================
# RMSNorm

def rms_ref(x, w, eps):
    x = x.astype(np.float64)
    inv = 1.0 / np.sqrt(np.mean(x * x, axis=0) + eps)
    return x * inv * w.astype(np.float64)[:, None], inv


def rms_bwd_ref(x, w, dy, eps):
    x, w, dy = (a.astype(np.float64) for a in (x, w, dy))
    C = x.shape[0]
    _, inv = rms_ref(x, w, eps)
    g = dy * w[:, None]
    dot = np.sum(g * x, axis=0)
    t1 = inv * g
    t2 = x * (inv ** 3 * dot / C)
    dw = np.sum(dy * x * inv, axis=1)
    # magnitudes of the terms, for cancellation-aware bounds
    mag_dx = np.abs(t1) + np.abs(x) * (inv ** 3 * np.sum(np.abs(g * x), axis=0) / C)
    mag_dw = np.sum(np.abs(dy * x * inv), axis=1)
    return t1 - t2, dw, mag_dx, mag_dw


RMS_SHAPES = [(1, 1), (1, 7), (3, 1), (7, 3), (17, 33), (33, 17), (65, 65), (64, 128), (48, 19)]


@pytest.mark.parametrize("C,S", RMS_SHAPES, ids=[f"{c}x{s}" for c, s in RMS_SHAPES])
@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rmsnorm_fwd(C, S, eps):
    rng = rng_for("rms", C, S)
    x = randn(rng, C, S, scale=2.0)
    w = f32(1.0 + 0.3 * rng.standard_normal(C))
    got = py_rmsnorm_fwd(x, w, eps)
    want, _ = rms_ref(x, w, eps)
    # ~6 float32 roundings per element (mean cast, +eps, sqrtf, reciprocal cast, two products)
    assert_within(got, want, 8 * U * np.abs(want) + TINY, "rmsnorm_fwd")


def test_rmsnorm_fwd_zero_and_tiny_inputs():
    # all-zero columns give zeros (eps keeps the rsqrt finite); tiny inputs are eps-dominated
    x = np.zeros((7, 5), np.float32)
    x[:, 3] = 1e-6
    w = f32(np.linspace(0.5, 2.0, 7))
    got = py_rmsnorm_fwd(x, w, 1e-5)
    want, _ = rms_ref(x, w, 1e-5)
    assert np.all(got[:, [0, 1, 2, 4]] == 0.0)
    assert_within(got, want, 8 * U * np.abs(want) + TINY, "rmsnorm tiny")


def test_rmsnorm_fwd_single_channel_is_sign_times_weight():
    x = f32([[3.0, -0.5, 100.0]])
    got = py_rmsnorm_fwd(x, f32([2.0]), 1e-6)
    np.testing.assert_allclose(got, [[2.0, -2.0, 2.0]], rtol=1e-5)  # |x| >> sqrt(eps) = 1e-3


@pytest.mark.parametrize("C,S", RMS_SHAPES, ids=[f"{c}x{s}" for c, s in RMS_SHAPES])
def test_rmsnorm_bwd_analytic(C, S):
    rng = rng_for("rmsbwd", C, S)
    eps = 1e-5
    x = randn(rng, C, S, scale=1.5)
    w = f32(1.0 + 0.3 * rng.standard_normal(C))
    dy = randn(rng, C, S)
    dx, dw = py_rmsnorm_bwd(x, w, dy, eps)
    assert dx.shape == (C, S) and dw.shape == (C,)
    want_dx, want_dw, mag_dx, mag_dw = rms_bwd_ref(x, w, dy, eps)
    # inv is rounded to float32 (rel. err ~2U, cubed in the second term ~6U), the rest is
    # double; the two terms of dx may cancel, so the bound is on their magnitudes
    assert_within(dx, want_dx, 16 * U * mag_dx + TINY, "rmsnorm_bwd dx")
    # dw: double sums of dy*x*inv with inv in float32 (~2U) then one cast
    assert_within(dw, want_dw, 8 * U * mag_dw + TINY, "rmsnorm_bwd dw")


@pytest.mark.parametrize("C,S", [(1, 3), (7, 5), (33, 4)])
def test_rmsnorm_bwd_finite_differences(C, S):
    rng = rng_for("rmsfd", C, S)
    eps = 1e-5
    x = randn(rng, C, S)
    w = f32(1.0 + 0.3 * rng.standard_normal(C))
    dy = randn(rng, C, S)
    dx, dw = py_rmsnorm_bwd(x, w, dy, eps)

    def loss(x64, w64):  # float64 reference forward, contracted with dy
        inv = 1.0 / np.sqrt(np.mean(x64 * x64, axis=0) + eps)
        return np.sum(dy.astype(np.float64) * x64 * inv * w64[:, None])

    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    _, _, mag_dx, mag_dw = rms_bwd_ref(x, w, dy, eps)
    h = 1e-6
    # float64 central differences: truncation ~h^2 and round-off ~1e-16/h, far below 1e-8;
    # the kernel's own float32 error is bounded as in the analytic test (terms may cancel:
    # with C = 1 the true dx is ~eps/x^2 times the size of either term)
    fd_err = 1e-8
    for c, s in {(0, 0), (C - 1, S - 1), (C // 2, S // 2)}:
        xp, xm = x64.copy(), x64.copy()
        xp[c, s] += h
        xm[c, s] -= h
        fd = (loss(xp, w64) - loss(xm, w64)) / (2 * h)
        assert abs(dx[c, s] - fd) <= 16 * U * mag_dx[c, s] + fd_err, (c, s, dx[c, s], fd)
    for c in {0, C - 1}:
        wp, wm = w64.copy(), w64.copy()
        wp[c] += h
        wm[c] -= h
        fd = (loss(x64, wp) - loss(x64, wm)) / (2 * h)
        assert abs(dw[c] - fd) <= 8 * U * mag_dw[c] + fd_err, (c, dw[c], fd)


def test_rmsnorm_rejects_mismatched_shapes():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError):
        py_rmsnorm_fwd(x, np.ones(2, np.float32), 1e-5)
    # the backward entry point must check as well (the kernel would read past w or dy)
    with pytest.raises(ValueError):
        py_rmsnorm_bwd(x, np.ones(2, np.float32), np.ones((4, 3), np.float32), 1e-5)
    with pytest.raises(ValueError):
        py_rmsnorm_bwd(x, np.ones(4, np.float32), np.ones((2, 3), np.float32), 1e-5)


# ======================================================================================
# RoPE

@pytest.mark.parametrize("hd", [2, 6, 64, 128])
@pytest.mark.parametrize("S", [1, 7, 65, 2048])
@pytest.mark.parametrize("theta", [10000.0, 500000.0, 1e6])
def test_rope_tables(hd, S, theta):
    cos_t, sin_t = rope_tables(hd, S, theta)
    assert cos_t.shape == sin_t.shape == (hd // 2, S)
    assert cos_t.dtype == sin_t.dtype == np.float32
    assert cos_t.flags.c_contiguous and sin_t.flags.c_contiguous
    i = np.arange(hd // 2, dtype=np.float64)
    angle = np.arange(S, dtype=np.float64)[None, :] * theta ** (-2.0 * i[:, None] / hd)
    # the tables are computed in float32 as HF does: the angle is good to ~1e-6 relative
    # (a few float32 roundings of inv_freq and of pos*inv_freq), then cos/sin rounding
    bound = 1e-6 * angle + 2 * U
    assert_within(cos_t, np.cos(angle), bound, "cos table")
    assert_within(sin_t, np.sin(angle), bound, "sin table")
    assert np.all(cos_t[:, 0] == 1.0) and np.all(sin_t[:, 0] == 0.0)  # position 0: identity


def rope_pairs(hd, half):
    """(row0, row1) index arrays inside one head for the two conventions."""
    i = np.arange(hd // 2)
    return (i, i + hd // 2) if half else (2 * i, 2 * i + 1)


def rope_ref(x, n_heads, cos_t, sin_t, half, inverse=False):
    """Explicit float64 rotation of each pair of rows by the tabulated angle."""
    x = x.astype(np.float64)
    c = cos_t.astype(np.float64)
    s = sin_t.astype(np.float64) * (-1.0 if inverse else 1.0)
    hd = x.shape[0] // n_heads
    r0, r1 = rope_pairs(hd, half)
    out = x.copy()
    for h in range(n_heads):
        a = x[h * hd + r0]
        b = x[h * hd + r1]
        out[h * hd + r0] = a * c - b * s
        out[h * hd + r1] = a * s + b * c
    return out


def rope_mag(x, n_heads, half):
    """|a| + |b| for each row's pair (the scale of a rotated entry)."""
    x = np.abs(x.astype(np.float64))
    hd = x.shape[0] // n_heads
    r0, r1 = rope_pairs(hd, half)
    out = x.copy()
    for h in range(n_heads):
        m = x[h * hd + r0] + x[h * hd + r1]
        out[h * hd + r0] = m
        out[h * hd + r1] = m
    return out


ROPE_CASES = [(1, 2, 1), (1, 6, 7), (3, 2, 33), (3, 16, 17), (2, 64, 65), (4, 8, 128)]
HALF = pytest.mark.parametrize("half", [False, True], ids=["interleaved", "half"])


@HALF
@pytest.mark.parametrize("n_heads,hd,S", ROPE_CASES, ids=[f"{n}h{d}x{s}" for n, d, s in ROPE_CASES])
def test_rope_forward(half, n_heads, hd, S):
    rng = rng_for("rope", half, n_heads, hd, S)
    cos_t, sin_t = rope_tables(hd, S, 10000.0)
    x = randn(rng, n_heads * hd, S)
    got = x.copy()
    assert py_rope(got, n_heads, cos_t, sin_t, half) is None  # in place
    want = rope_ref(x, n_heads, cos_t, sin_t, half)
    # two products and one sum in float32 per entry
    assert_within(got, want, 3 * U * rope_mag(x, n_heads, half) + TINY, "rope fwd")
    if S > 1:  # column 0 (angle 0) is untouched, the others rotate
        assert np.array_equal(got[:, 0], x[:, 0])
        assert not np.allclose(got[:, 1:], x[:, 1:])


@HALF
@pytest.mark.parametrize("n_heads,hd,S", ROPE_CASES, ids=[f"{n}h{d}x{s}" for n, d, s in ROPE_CASES])
def test_rope_backward_is_transpose(half, n_heads, hd, S):
    rng = rng_for("ropebwd", half, n_heads, hd, S)
    cos_t, sin_t = rope_tables(hd, S, 10000.0)
    x = randn(rng, n_heads * hd, S)
    dy = randn(rng, n_heads * hd, S)
    rx = x.copy()
    py_rope(rx, n_heads, cos_t, sin_t, half)
    rtdy = dy.copy()
    py_rope(rtdy, n_heads, cos_t, sin_t, half, backward=True)
    lhs = np.sum(dy.astype(np.float64) * rx)
    rhs = np.sum(rtdy.astype(np.float64) * x)
    # each side carries ~3U relative error per rotated entry
    mag = np.sum(np.abs(dy.astype(np.float64)) * rope_mag(x, n_heads, half))
    assert abs(lhs - rhs) <= 8 * U * mag
    # and explicitly: backward is rotation by the opposite angle
    want = rope_ref(dy, n_heads, cos_t, sin_t, half, inverse=True)
    assert_within(rtdy, want, 3 * U * rope_mag(dy, n_heads, half) + TINY, "rope bwd")


@HALF
@pytest.mark.parametrize("n_heads,hd,S", ROPE_CASES, ids=[f"{n}h{d}x{s}" for n, d, s in ROPE_CASES])
def test_rope_forward_then_backward_is_identity(half, n_heads, hd, S):
    rng = rng_for("ropeid", half, n_heads, hd, S)
    cos_t, sin_t = rope_tables(hd, S, 10000.0)
    x = randn(rng, n_heads * hd, S)
    y = x.copy()
    py_rope(y, n_heads, cos_t, sin_t, half)
    py_rope(y, n_heads, cos_t, sin_t, half, backward=True)
    # cos^2 + sin^2 of the float32 tables is 1 within ~2U, plus ~6U of arithmetic
    assert_within(y, x, 12 * U * rope_mag(x, n_heads, half) + TINY, "rope fwd+bwd")


def test_rope_conventions_are_row_permutations_of_each_other():
    # "half" on HF row order == "interleaved" on rows reordered (i, i+hd/2) -> (2i, 2i+1)
    n_heads, hd, S = 3, 8, 11
    rng = rng_for("ropeperm")
    cos_t, sin_t = rope_tables(hd, S, 10000.0)
    x_half = randn(rng, n_heads * hd, S)
    perm = np.empty(hd, np.int64)
    perm[0::2] = np.arange(hd // 2)
    perm[1::2] = np.arange(hd // 2) + hd // 2
    rows = (np.arange(n_heads)[:, None] * hd + perm[None, :]).reshape(-1)
    x_inter = f32(x_half[rows])
    py_rope(x_half, n_heads, cos_t, sin_t, True)
    py_rope(x_inter, n_heads, cos_t, sin_t, False)
    assert np.array_equal(x_half[rows], x_inter)  # same arithmetic, only rows move


def test_rope_rejects_bad_shapes():
    cos_t, sin_t = rope_tables(8, 5, 10000.0)
    with pytest.raises(ValueError):
        py_rope(np.zeros((12, 5), np.float32), 2, cos_t, sin_t, False)  # hd=6 vs table 4 rows
    with pytest.raises(ValueError):
        py_rope(np.zeros((16, 6), np.float32), 2, cos_t, sin_t, False)  # S differs
    c3, s3 = rope_tables(6, 5, 10000.0)
    with pytest.raises(ValueError):
        py_rope(np.zeros((9, 5), np.float32), 3, c3, s3, True)  # odd head_dim
    with pytest.raises(ValueError):
        py_rope(np.zeros((16, 5), np.float32), 3, cos_t, sin_t, True)  # 16 rows, 3 heads


# ======================================================================================
# SwiGLU

def swiglu_inputs(n, seed):
    rng = rng_for("swiglu", n, seed)
    h1 = rng.standard_normal(n) * 4.0
    h1[: min(n, 8)] = [0.0, -1.2785, 20.0, -20.0, 88.0, -88.0, 100.0, -100.0][: min(n, 8)]
    return f32(h1), randn(rng, n), randn(rng, n)


@pytest.mark.parametrize("n", ODD + [8, 64, 1000])
def test_swiglu_fwd(n):
    h1, h3, _ = swiglu_inputs(n, 0)
    got = py_swiglu_fwd(h1, h3)
    x = h1.astype(np.float64)
    sig = 1.0 / (1.0 + np.exp(-x))
    want = x * sig * h3
    # expf (~1 ulp) and three roundings, relative; far tails underflow to zero: absolute TINY
    assert_within(got, want, 6 * U * np.abs(want) + 1e-37, "swiglu_fwd")


@pytest.mark.parametrize("n", ODD + [8, 64, 1000])
def test_swiglu_bwd(n):
    h1, h3, dg = swiglu_inputs(n, 1)
    dh1, dh3 = py_swiglu_bwd(h1, h3, dg)
    x, b, d = (a.astype(np.float64) for a in (h1, h3, dg))
    sig = 1.0 / (1.0 + np.exp(-x))
    want1 = d * b * (sig + x * sig * (1.0 - sig))
    want3 = d * x * sig
    # (1 + x(1-sig)) cancels near x = -1.28 and 1-sig loses relative accuracy for large x:
    # bound by the magnitudes of the terms, ~10 float32 roundings
    mag1 = np.abs(d * b) * (sig + np.abs(x) * sig * (1.0 - sig) + np.abs(x) * sig * U)
    assert_within(dh1, want1, 16 * U * mag1 + 1e-37, "swiglu dh1")
    assert_within(dh3, want3, 8 * U * np.abs(want3) + 1e-37, "swiglu dh3")


def test_swiglu_bwd_matches_finite_differences_of_fwd():
    h1, h3, dg = swiglu_inputs(17, 2)
    h1 = f32(np.clip(h1, -6, 6))
    dh1, dh3 = py_swiglu_bwd(h1, h3, dg)
    x, b, d = (a.astype(np.float64) for a in (h1, h3, dg))
    f = lambda x, b: np.sum(d * x / (1.0 + np.exp(-x)) * b)  # noqa: E731
    h = 1e-6
    fd1 = np.array([(f(x + h * e, b) - f(x - h * e, b)) / (2 * h) for e in np.eye(17)])
    fd3 = np.array([(f(x, b + h * e) - f(x, b - h * e)) / (2 * h) for e in np.eye(17)])
    # float32 outputs vs float64 central differences (truncation ~1e-12)
    np.testing.assert_allclose(dh1, fd1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dh3, fd3, rtol=1e-5, atol=1e-6)


def test_swiglu_rejects_length_mismatch():
    with pytest.raises(ValueError):
        py_swiglu_fwd(np.zeros(3, np.float32), np.zeros(4, np.float32))
    with pytest.raises(ValueError):
        py_swiglu_bwd(np.zeros(3, np.float32), np.zeros(3, np.float32), np.zeros(2, np.float32))


# ======================================================================================
# Attention

def attn_ref(q, k, v, n_heads, n_kv_heads):
    """float64 causal GQA attention; returns out, probs [n_heads*S, S] and score magnitudes."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    S = q.shape[1]
    hd = q.shape[0] // n_heads
    ratio = n_heads // n_kv_heads
    out = np.zeros_like(q)
    probs = np.zeros((n_heads * S, S))
    smag = 0.0
    mask = np.triu(np.ones((S, S), bool), 1)
    for h in range(n_heads):
        g = h // ratio
        qh, kh, vh = q[h * hd:(h + 1) * hd], k[g * hd:(g + 1) * hd], v[g * hd:(g + 1) * hd]
        s = qh.T @ kh / np.sqrt(hd)
        smag = max(smag, (np.abs(qh).T @ np.abs(kh) / np.sqrt(hd))[~mask].max())
        s[mask] = -np.inf
        s -= s.max(axis=1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(axis=1, keepdims=True)
        probs[h * S:(h + 1) * S] = p
        out[h * hd:(h + 1) * hd] = vh @ p.T
    return out, probs, smag


def attn_err_factor(hd, S, smag):
    # A score carries up to ~hd*U*smag absolute error (fp32 dot over hd terms), which is the
    # relative error it puts into its probability; softmax and the sums over S keys add
    # ~S*U. Componentwise bounds below are this factor times a magnitude twin.
    return 4 * U * (hd * (1.0 + smag) + S + 4)


ATTN_CASES = [
    # n_heads, n_kv_heads, hd, S
    (1, 1, 2, 1), (2, 1, 4, 3), (4, 2, 8, 7), (6, 3, 16, 33), (4, 4, 8, 17), (8, 2, 64, 65),
    (3, 1, 6, 128), (4, 2, 12, 19),
]
ATTN = pytest.mark.parametrize("n_heads,n_kv,hd,S", ATTN_CASES,
                               ids=[f"h{a}kv{b}d{c}s{d}" for a, b, c, d in ATTN_CASES])


@ATTN
def test_attention_fwd(n_heads, n_kv, hd, S):
    rng = rng_for("attn", n_heads, n_kv, hd, S)
    q = randn(rng, n_heads * hd, S)
    k = randn(rng, n_kv * hd, S)
    v = randn(rng, n_kv * hd, S)
    got = py_attention_fwd(q, k, v, n_heads, n_kv)
    assert got.shape == q.shape and got.dtype == np.float32
    want, probs, smag = attn_ref(q, k, v, n_heads, n_kv)
    ratio = n_heads // n_kv
    mag = np.zeros_like(want)
    for h in range(n_heads):  # |v_g| @ P^T
        g = h // ratio
        mag[h * hd:(h + 1) * hd] = np.abs(v[g * hd:(g + 1) * hd]).astype(np.float64) \
            @ probs[h * S:(h + 1) * S].T
    assert_within(got, want, attn_err_factor(hd, S, smag) * mag + TINY, "attention_fwd")
    # the first query sees only the first key: out[:, 0] is v[:, 0] of its kv head
    for h in range(n_heads):
        g = h // ratio
        np.testing.assert_allclose(got[h * hd:(h + 1) * hd, 0], v[g * hd:(g + 1) * hd, 0],
                                   rtol=4 * U, atol=0)


def test_attention_fwd_is_causal_and_uses_the_right_kv_head():
    n_heads, n_kv, hd, S = 6, 2, 8, 13
    rng = rng_for("causal")
    q = randn(rng, n_heads * hd, S)
    k = randn(rng, n_kv * hd, S)
    v = randn(rng, n_kv * hd, S)
    base = py_attention_fwd(q, k, v, n_heads, n_kv)
    # changing keys/values at positions > t leaves outputs at positions <= t unchanged
    t = 5
    k2, v2 = k.copy(), v.copy()
    k2[:, t + 1:] += 3.0
    v2[:, t + 1:] -= 7.0
    other = py_attention_fwd(q, k2, v2, n_heads, n_kv)
    assert np.array_equal(base[:, :t + 1], other[:, :t + 1])
    assert not np.allclose(base[:, t + 1:], other[:, t + 1:])
    # changing kv head 1 only affects query heads 3..5 (ratio 3)
    v3 = v.copy()
    v3[hd:] += 1.0
    other = py_attention_fwd(q, k, v3, n_heads, n_kv)
    assert np.array_equal(base[:3 * hd], other[:3 * hd])
    assert not np.allclose(base[3 * hd:], other[3 * hd:])


def test_attention_fwd_large_scores_are_stable():
    n_heads, n_kv, hd, S = 2, 1, 16, 9
    rng = rng_for("attnlarge")
    q = randn(rng, n_heads * hd, S, scale=30.0)  # scores of order 1e3: exp would overflow
    k = randn(rng, n_kv * hd, S, scale=30.0)
    v = randn(rng, n_kv * hd, S)
    got = py_attention_fwd(q, k, v, n_heads, n_kv)
    want, _, smag = attn_ref(q, k, v, n_heads, n_kv)
    assert np.all(np.isfinite(got))
    # near-one-hot rows: the error relative to max|v| is bounded by the score error
    assert np.abs(got - want).max() <= attn_err_factor(hd, S, smag) * np.abs(v).max()


def test_attention_fwd_rejects_bad_shapes():
    q = np.zeros((8, 5), np.float32)
    with pytest.raises(ValueError):
        py_attention_fwd(q, np.zeros((4, 5), np.float32), np.zeros((4, 5), np.float32), 4, 3)
    with pytest.raises(ValueError):  # k has 3 heads' rows for 2 kv heads
        py_attention_fwd(q, np.zeros((6, 5), np.float32), np.zeros((6, 5), np.float32), 4, 2)
    with pytest.raises(ValueError):  # S differs
        py_attention_fwd(q, np.zeros((4, 4), np.float32), np.zeros((4, 4), np.float32), 4, 2)


def test_attention_fwd_rejects_rows_not_divisible_by_heads():
    # 9 rows cannot be 2 heads: the kernel would cover rows 0..7 and leave row 8 unset
    q = np.ones((9, 5), np.float32)
    k = np.ones((4, 5), np.float32)
    with pytest.raises(ValueError):
        py_attention_fwd(q, k, k, 2, 1)


def attn_bwd_ref(q, k_rep, v_rep, da, n_heads):
    """float64 analytic backward of causal MHA (k, v already repeated) and magnitude twins."""
    q, k, v, da = (a.astype(np.float64) for a in (q, k_rep, v_rep, da))
    S = q.shape[1]
    hd = q.shape[0] // n_heads
    _, probs, smag = attn_ref(q, k, v, n_heads, n_heads)
    scale = 1.0 / np.sqrt(hd)
    res = {name: np.zeros_like(q) for name in ("dq", "dk", "dv", "dq_mag", "dk_mag", "dv_mag")}
    dprobs = np.zeros((n_heads * S, S))
    dprobs_mag = np.zeros((n_heads * S, S))
    for h in range(n_heads):
        sl = slice(h * hd, (h + 1) * hd)
        rows = slice(h * S, (h + 1) * S)
        P = probs[rows]
        dP = da[sl].T @ v[sl]                      # dP[i, j] = da_i . v_j
        dP_mag = np.abs(da[sl]).T @ np.abs(v[sl])
        dS = P * (dP - np.sum(P * dP, axis=1, keepdims=True))
        dS_mag = P * (dP_mag + np.sum(P * dP_mag, axis=1, keepdims=True))
        dprobs[rows], dprobs_mag[rows] = dP, dP_mag
        res["dv"][sl] = da[sl] @ P                  # dv[c, j] = sum_i da[c, i] P[i, j]
        res["dv_mag"][sl] = np.abs(da[sl]) @ P
        res["dq"][sl] = scale * k[sl] @ dS.T        # dq[c, i] = sum_j k[c, j] dS[i, j]
        res["dq_mag"][sl] = scale * np.abs(k[sl]) @ dS_mag.T
        res["dk"][sl] = scale * q[sl] @ dS          # dk[c, j] = sum_i q[c, i] dS[i, j]
        res["dk_mag"][sl] = scale * np.abs(q[sl]) @ dS_mag
    return res, probs, dprobs, dprobs_mag, smag


@ATTN
def test_attention_bwd(n_heads, n_kv, hd, S):
    rng = rng_for("attnbwd", n_heads, hd, S)
    q, k_rep, v_rep, da = (randn(rng, n_heads * hd, S) for _ in range(4))
    dq, dk, dv, probs, dprobs = py_attention_bwd(q, k_rep, v_rep, da, n_heads)
    ref, want_p, want_dp, dp_mag, smag = attn_bwd_ref(q, k_rep, v_rep, da, n_heads)
    fac = attn_err_factor(hd, S, smag)
    assert probs.shape == dprobs.shape == (n_heads * S, S)
    # layout probs[h*S + i, j] = P(query i -> key j), exactly zero above the diagonal
    upper = np.tile(np.triu(np.ones((S, S), bool), 1), (n_heads, 1))
    assert np.all(probs[upper] == 0.0)
    assert_within(probs, want_p, fac * want_p + TINY, "probs")
    np.testing.assert_allclose(probs.astype(np.float64).reshape(n_heads, S, S).sum(axis=2), 1.0,
                               rtol=0, atol=(S + 2) * U)  # rows are distributions
    # dprobs: one fp32 dot over hd terms per entry (full square, not masked)
    assert_within(dprobs, want_dp, 2 * (hd + 2) * U * dp_mag + TINY, "dprobs")
    assert_within(dv, ref["dv"], fac * ref["dv_mag"] + TINY, "dv_rep")
    assert_within(dq, ref["dq"], fac * ref["dq_mag"] + TINY, "dq")
    assert_within(dk, ref["dk"], fac * ref["dk_mag"] + TINY, "dk_rep")


def test_attention_bwd_probs_agree_with_fwd():
    n_heads, hd, S = 3, 8, 21
    rng = rng_for("attnagree")
    q, k, v, da = (randn(rng, n_heads * hd, S) for _ in range(4))
    out = py_attention_fwd(q, k, v, n_heads, n_heads)
    _, _, _, probs, _ = py_attention_bwd(q, k, v, da, n_heads)
    for h in range(n_heads):  # out_h = v_h @ P_h^T, with P from the backward's recomputation
        sl = slice(h * hd, (h + 1) * hd)
        P = probs[h * S:(h + 1) * S].astype(np.float64)
        # both are fp32 sums over S terms of the same probabilities (recomputed identically)
        np.testing.assert_allclose(out[sl], v[sl].astype(np.float64) @ P.T, rtol=0,
                                   atol=4 * (S + 2) * U * np.abs(v).max())


def test_attention_gqa_backward_matches_finite_differences():
    """The full GQA backward (repeat -> attention_bwd -> reduce) is the gradient of
    sum(da * attention_fwd(q, k, v)), checked by float64 central differences."""
    n_heads, n_kv, hd, S = 4, 2, 4, 6
    rng = rng_for("attnfd")
    q = randn(rng, n_heads * hd, S)
    k = randn(rng, n_kv * hd, S)
    v = randn(rng, n_kv * hd, S)
    da = randn(rng, n_heads * hd, S)
    k_rep = py_gqa_repeat(k, n_heads, n_kv)
    v_rep = py_gqa_repeat(v, n_heads, n_kv)
    dq, dk_rep, dv_rep, _, _ = py_attention_bwd(q, k_rep, v_rep, da, n_heads)
    dk = py_gqa_reduce(dk_rep, n_heads, n_kv)
    dv = py_gqa_reduce(dv_rep, n_heads, n_kv)

    def f(q, k, v):
        return np.sum(da.astype(np.float64) * attn_ref(q, k, v, n_heads, n_kv)[0])

    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    h = 1e-6
    for name, grad, which in (("dq", dq, 0), ("dk", dk, 1), ("dv", dv, 2)):
        fd = np.zeros(grad.shape)
        for idx in np.ndindex(grad.shape):
            args_p = [q64.copy(), k64.copy(), v64.copy()]
            args_m = [q64.copy(), k64.copy(), v64.copy()]
            args_p[which][idx] += h
            args_m[which][idx] -= h
            fd[idx] = (f(*args_p) - f(*args_m)) / (2 * h)
        # float32 gradients of O(1) size vs float64 central differences (truncation ~1e-11)
        np.testing.assert_allclose(grad, fd, rtol=0, atol=2e-5 * np.abs(fd).max(),
                                   err_msg=name)


def test_attention_bwd_rejects_bad_shapes():
    a = np.zeros((8, 5), np.float32)
    with pytest.raises(ValueError):
        py_attention_bwd(a, np.zeros((4, 5), np.float32), a, a, 2)
    with pytest.raises(ValueError):
        py_attention_bwd(a, a, a, np.zeros((8, 4), np.float32), 2)


def test_attention_bwd_rejects_rows_not_divisible_by_heads():
    a = np.ones((9, 5), np.float32)  # 9 rows, 2 heads: row 8 of dq/dk/dv would be left unset
    with pytest.raises(ValueError):
        py_attention_bwd(a, a, a, a, 2)


# ======================================================================================
# GQA repeat / reduce

GQA_CASES = [(1, 1, 2, 1), (2, 1, 3, 7), (4, 2, 8, 17), (6, 2, 5, 33), (8, 2, 16, 65),
             (12, 3, 7, 3), (3, 3, 4, 5)]
GQA = pytest.mark.parametrize("n_heads,n_kv,hd,S", GQA_CASES,
                              ids=[f"h{a}kv{b}d{c}s{d}" for a, b, c, d in GQA_CASES])


@GQA
def test_gqa_repeat(n_heads, n_kv, hd, S):
    rng = rng_for("rep", n_heads, n_kv, hd, S)
    x = randn(rng, n_kv * hd, S)
    got = py_gqa_repeat(x, n_heads, n_kv)
    want = np.repeat(x.reshape(n_kv, hd, S), n_heads // n_kv, axis=0).reshape(n_heads * hd, S)
    assert np.array_equal(got, want)  # HF repeat_kv: head h reads kv head h // ratio; a copy


@GQA
def test_gqa_reduce(n_heads, n_kv, hd, S):
    rng = rng_for("red", n_heads, n_kv, hd, S)
    ratio = n_heads // n_kv
    y = randn(rng, n_heads * hd, S)
    got = py_gqa_reduce(y, n_heads, n_kv)
    assert got.shape == (n_kv * hd, S)
    groups = y.astype(np.float64).reshape(n_kv, ratio, hd, S)
    want = groups.sum(axis=1).reshape(n_kv * hd, S)
    # float32 sum of `ratio` terms: |err| <= gamma_(ratio-1) * sum|terms| (exact for ratio 1)
    mag = np.abs(groups).sum(axis=1).reshape(n_kv * hd, S)
    assert_within(got, want, 1.01 * (ratio - 1) * U * mag + TINY, "gqa_reduce")


@GQA
def test_gqa_repeat_then_reduce_is_ratio_times_identity(n_heads, n_kv, hd, S):
    rng = rng_for("repred", n_heads, n_kv, hd, S)
    ratio = n_heads // n_kv
    x = randn(rng, n_kv * hd, S)
    got = py_gqa_reduce(py_gqa_repeat(x, n_heads, n_kv), n_heads, n_kv)
    # ratio float32 additions of the same value: exact for ratio <= 3, ~(ratio-1)U otherwise
    assert_within(got, ratio * x.astype(np.float64),
                  (ratio - 1) * U * ratio * np.abs(x) + TINY, "repeat/reduce")
    if ratio in (1, 2):
        assert np.array_equal(got, x * np.float32(ratio))


@GQA
def test_gqa_reduce_is_transpose_of_repeat(n_heads, n_kv, hd, S):
    rng = rng_for("adj", n_heads, n_kv, hd, S)
    ratio = n_heads // n_kv
    x = randn(rng, n_kv * hd, S)
    y = randn(rng, n_heads * hd, S)
    lhs = np.sum(py_gqa_repeat(x, n_heads, n_kv).astype(np.float64) * y)
    rhs = np.sum(x.astype(np.float64) * py_gqa_reduce(y, n_heads, n_kv))
    # the only rounding is reduce's float32 sums over `ratio` terms
    mag = np.sum(np.abs(np.repeat(x.reshape(n_kv, hd, S), ratio, axis=0).reshape(-1))
                 * np.abs(y.reshape(-1)))
    assert abs(lhs - rhs) <= ratio * U * mag + TINY


def test_gqa_rejects_bad_head_counts():
    # n_kv_heads must divide n_heads and the rows must split into whole heads; otherwise
    # the kernels would read past the source array
    with pytest.raises(ValueError):
        py_gqa_repeat(np.ones((2, 5), np.float32), 3, 2)
    with pytest.raises(ValueError):
        py_gqa_reduce(np.ones((3, 5), np.float32), 3, 2)
    with pytest.raises(ValueError):
        py_gqa_repeat(np.ones((5, 5), np.float32), 4, 2)
    with pytest.raises(ValueError):
        py_gqa_reduce(np.ones((6, 5), np.float32), 4, 2)


# ======================================================================================
# Softmax cross-entropy

def xent_ref(logits, targets, grad_scale):
    x = logits.astype(np.float64)
    mx = x.max(axis=1, keepdims=True)
    z = x - mx
    lse = np.log(np.sum(np.exp(z), axis=1))
    loss = np.sum(lse - z[np.arange(len(targets)), targets])
    p = np.exp(z - lse[:, None])
    onehot = np.zeros_like(p)
    onehot[np.arange(len(targets)), targets] = 1.0
    return loss, (p - onehot) * grad_scale, p, onehot, z


XENT_CASES = [(1, 1), (1, 2), (3, 7), (17, 61), (33, 65), (5, 1000), (64, 128)]


@pytest.mark.parametrize("S,V", XENT_CASES, ids=[f"{s}x{v}" for s, v in XENT_CASES])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37, 1.0 / 19])
@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
def test_softmax_xent(S, V, grad_scale, logit_scale):
    rng = rng_for("xent", S, V, logit_scale)
    logits = randn(rng, S, V, scale=logit_scale)
    targets = rng.integers(0, V, S).astype(np.int32)
    keep = logits.copy()
    loss, dlogits = py_softmax_xent(logits, targets, grad_scale)
    assert np.array_equal(logits, keep)  # the entry point works on a copy
    assert dlogits.shape == (S, V) and dlogits.dtype == np.float32
    gs = np.float64(np.float32(grad_scale))
    want_loss, want_d, p, onehot, z = xent_ref(logits, targets, gs)
    # per row: log of a double sum of expf values (~2U) and a float32 difference x_t - max
    row_mag = 1.0 + np.abs(z[np.arange(S), targets])
    assert abs(loss - want_loss) <= 4 * U * np.sum(row_mag)
    # p = expf(z) * float32(gs/total): ~4U relative; the target entry subtracts gs (1 more U)
    # z itself carries a float32 rounding of x - max, which moves exp(z) by |z|*U relative
    bound = 4 * U * gs * (p * (1.0 + np.abs(z)) + onehot) + TINY
    assert_within(dlogits, want_d, bound, "dlogits")
    # each row of dlogits sums to zero (softmax sums to one)
    assert np.all(np.abs(dlogits.astype(np.float64).sum(axis=1)) <= (V + 4) * 4 * U * gs)


def test_softmax_xent_large_logits_do_not_overflow():
    rng = rng_for("xentbig")
    S, V = 6, 11
    targets = rng.integers(0, V, S).astype(np.int32)
    for logits in (randn(rng, S, V, scale=1e4), np.full((S, V), 1e4, np.float32),
                   np.full((S, V), -1e4, np.float32), randn(rng, S, V, scale=1e4) + 1e5):
        loss, dlogits = py_softmax_xent(f32(logits), targets)
        assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
        want_loss, want_d, p, onehot, z = xent_ref(f32(logits), targets, 1.0)
        assert abs(loss - want_loss) <= 4 * U * np.sum(1.0 + np.abs(z[np.arange(S), targets]))
        assert_within(dlogits, want_d, 4 * U * (p * (1.0 + np.abs(z)) + onehot) + TINY,
                      "dlogits large")
    loss, _ = py_softmax_xent(np.full((S, V), 1e4, np.float32), targets)
    assert abs(loss - S * np.log(V)) <= 1e-12 * S * np.log(V) + S * 4 * U  # uniform rows


def test_softmax_xent_rejects_out_of_range_targets():
    logits = np.zeros((3, 5), np.float32)
    for bad in ([0, 5, 1], [0, -1, 1], [2**31 - 1, 0, 0]):
        with pytest.raises(ValueError):
            py_softmax_xent(logits, np.array(bad, np.int32))
    with pytest.raises(ValueError):  # one target per row
        py_softmax_xent(logits, np.array([0, 1], np.int32))


# ======================================================================================
# Embedding

@pytest.mark.parametrize("vocab,D,S", [(1, 1, 1), (5, 3, 7), (61, 48, 19), (17, 65, 33),
                                       (1000, 64, 128)])
def test_embedding_fwd(vocab, D, S):
    rng = rng_for("emb", vocab, D, S)
    E = randn(rng, vocab, D)
    tokens = rng.integers(0, vocab, S).astype(np.int32)
    tokens[-1] = tokens[0]  # a repeat
    x = py_embedding_fwd(E, tokens)
    assert x.shape == (D, S)
    assert np.array_equal(x, E[tokens].T)  # a gather: exact


@pytest.mark.parametrize("vocab,D,S", [(1, 1, 1), (5, 3, 7), (61, 48, 19), (17, 65, 33),
                                       (3, 64, 128)])
def test_embedding_bwd_accumulates_repeats(vocab, D, S):
    rng = rng_for("embbwd", vocab, D, S)
    tokens = rng.integers(0, vocab, S).astype(np.int32)
    tokens[: min(S, 3)] = 0  # token 0 at least min(S, 3) times
    dx = randn(rng, D, S)
    dE0 = randn(rng, vocab, D)
    dE = dE0.copy()
    assert py_embedding_bwd(dE, tokens, dx) is None  # in place, added to what is there
    want = dE0.astype(np.float64)
    np.add.at(want, tokens, dx.T.astype(np.float64))
    counts = np.bincount(tokens, minlength=vocab)[:, None]
    # each row is a float32 running sum of (1 + its count) terms: gamma_count * sum|terms|
    mag = np.abs(dE0).astype(np.float64)
    np.add.at(mag, tokens, np.abs(dx.T).astype(np.float64))
    assert_within(dE, want, 1.01 * counts * U * mag + TINY, "embedding_bwd")
    untouched = counts[:, 0] == 0
    assert np.array_equal(dE[untouched], dE0[untouched])


def test_embedding_rejects_out_of_range_ids():
    E = np.zeros((5, 3), np.float32)
    for bad in ([0, 5], [-1, 0], [2**31 - 1, 1]):
        with pytest.raises(ValueError):
            py_embedding_fwd(E, np.array(bad, np.int32))
        dE = np.zeros((5, 3), np.float32)
        with pytest.raises(ValueError):
            py_embedding_bwd(dE, np.array(bad, np.int32), np.ones((3, 2), np.float32))
        assert not dE.any()  # nothing was written
    with pytest.raises(ValueError):  # dx has the wrong shape
        py_embedding_bwd(np.zeros((5, 3), np.float32), np.array([0, 1], np.int32),
                         np.ones((3, 3), np.float32))


# ======================================================================================
# AdamW

ADAM = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def adamw_numpy(p, grads, lr, beta1, beta2, eps, weight_decay, grad_scale=1.0):
    """float64 transcription of torch.optim.AdamW's update (decoupled decay)."""
    p = p.astype(np.float64)
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64) * grad_scale
        p = p * (1.0 - lr * weight_decay)
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        mhat = m / (1.0 - beta1 ** t)
        vhat = v / (1.0 - beta2 ** t)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p, m, v


def adam_problem(n, n_steps, key):
    rng = rng_for("adam", n, key)
    p0 = randn(rng, n)
    grads = [randn(rng, n, scale=10.0 ** rng.uniform(-3, 1)) for _ in range(n_steps)]
    if n >= 7:
        p0[0] = 0.0
        for g in grads:
            g[1] = 0.0  # a parameter that only decays
    return p0, grads


def run_ours(p0, grads, grad_scale=1.0, **hp):
    hp = {**ADAM, **hp}
    p = p0.copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        py_adamw(p, g, m, v, hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"], t,
                 grad_scale)
    return p, m, v


def run_torch(p0, grads, **hp):
    hp = {**ADAM, **hp}
    p = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = torch.optim.AdamW([p], lr=hp["lr"], betas=(hp["beta1"], hp["beta2"]), eps=hp["eps"],
                            weight_decay=hp["weight_decay"], foreach=False)
    for g in grads:
        p.grad = torch.from_numpy(g.copy())
        opt.step()
    st = opt.state[p]
    return p.detach().numpy(), st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()


def assert_adam_close(ours, theirs, grads, rel=1e-6, **hp):
    """1e-6 relative, measured against the size of what each quantity is made of: torch runs
    the same fp32 formula in the same order, only its scalars (1 - beta, bias corrections)
    are computed in double, so each result differs by a few float32 roundings."""
    hp = {**ADAM, **hp}
    n_steps = len(grads)
    gmax = max(float(np.abs(g).max()) for g in grads)
    (p, m, v), (tp, tm, tv) = ours, theirs
    # p moves by at most ~lr per step (the Adam step is bounded by lr / bias correction)
    assert_within(p, tp, rel * (np.abs(tp) + hp["lr"] * n_steps), "adamw p")
    # m is a lerp toward g and may cancel: relative to the (1 - beta1) * g terms summed in
    assert_within(m, tm, rel * (np.abs(tm) + (1.0 - hp["beta1"]) * gmax), "adamw exp_avg")
    # v is a sum of non-negative terms: plainly relative
    assert_within(v, tv, rel * np.abs(tv) + TINY, "adamw exp_avg_sq")


@pytest.mark.parametrize("n", [1, 7, 33, 1000])
@pytest.mark.parametrize("hp", [{}, dict(lr=3e-4, weight_decay=0.0),
                                dict(lr=1e-1, beta1=0.8, beta2=0.9, eps=1e-6, weight_decay=0.5)],
                         ids=["default", "no-decay", "big-lr"])
def test_adamw_matches_torch(n, hp):
    p0, grads = adam_problem(n, 6, "torch")
    assert_adam_close(run_ours(p0, grads, **hp), run_torch(p0, grads, **hp), grads, **hp)


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_adamw_matches_torch_default_betas(n):
    # torch's own defaults, betas=(0.9, 0.999): same 1e-6 relative requirement
    hp = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
    p0, grads = adam_problem(n, 6, "torch-defaults")
    assert_adam_close(run_ours(p0, grads, **hp), run_torch(p0, grads, **hp), grads, **hp)


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_adamw_matches_numpy_formula(n):
    n_steps = 6
    p0, grads = adam_problem(n, n_steps, "numpy")
    p, m, v = run_ours(p0, grads)
    want_p, want_m, want_v = adamw_numpy(p0, grads, **ADAM)
    gmax = max(np.abs(g).max() for g in grads)
    # float32 state vs float64 formula: a few roundings per step on each quantity; m can
    # cancel, so its bound is absolute (in units of the largest gradient), and the update
    # (lr * mhat / sqrt(vhat)) inherits that as an absolute error of order lr * n_steps * U
    np.testing.assert_allclose(v, want_v, rtol=4 * n_steps * U, atol=1e-30)
    np.testing.assert_allclose(m, want_m, rtol=0, atol=4 * n_steps * U * gmax)
    np.testing.assert_allclose(p, want_p, rtol=4 * n_steps * U, atol=64 * n_steps * U * ADAM["lr"])


@pytest.mark.parametrize("n", [1, 7, 1000])
@pytest.mark.parametrize("grad_scale", [0.25, 1.0 / 3, 8.0])
def test_adamw_grad_scale_multiplies_the_gradient_first(n, grad_scale):
    p0, grads = adam_problem(n, 4, "scale")
    gs32 = np.float32(grad_scale)
    scaled = [f32(g * gs32) for g in grads]
    got = run_ours(p0, grads, grad_scale=grad_scale)
    # the kernel's first step is g * grad_scale in float32, exactly numpy's product
    for a, b in zip(got, run_ours(p0, scaled)):
        assert np.array_equal(a, b)
    assert_adam_close(got, run_torch(p0, scaled), scaled)  # and that is torch on g * scale


def test_adamw_zero_gradient_only_decays():
    p0 = f32(np.linspace(-2, 2, 9))
    p, m, v = run_ours(p0, [np.ones(9, np.float32)] * 3, grad_scale=0.0)
    assert not m.any() and not v.any()
    decay = 1.0 - np.float32(ADAM["lr"]) * np.float32(ADAM["weight_decay"])
    np.testing.assert_allclose(p, p0 * decay ** 3, rtol=8 * U)  # 3 float32 products


def test_adamw_rejects_bad_arguments():
    z = np.zeros(4, np.float32)
    with pytest.raises(ValueError):
        py_adamw(z.copy(), z, z.copy(), z.copy(), 1e-3, 0.9, 0.95, 1e-8, 0.1, 0)  # step from 1
    with pytest.raises(ValueError):
        py_adamw(z.copy(), np.zeros(3, np.float32), z.copy(), z.copy(), 1e-3, 0.9, 0.95, 1e-8,
                 0.1, 1)
    with pytest.raises(ValueError):
        py_adamw(z.copy(), z, z.copy(), np.zeros(5, np.float32), 1e-3, 0.9, 0.95, 1e-8, 0.1, 1)


# ======================================================================================
# sumsq

@pytest.mark.parametrize("n", [0] + ODD + [8, 64, 1000, 100_003])
def test_sumsq(n):
    rng = rng_for("sumsq", n)
    x = randn(rng, n, scale=3.0)
    got = py_sumsq(x)
    assert isinstance(got, float)
    want = np.sum(x.astype(np.float64) ** 2)
    # products of float32 values are exact in double; n double additions: ~n * 2^-53
    assert abs(got - want) <= (n + 1) * 2.0 ** -52 * want


def test_sumsq_large_values_do_not_overflow_float32():
    x = np.full(10, 3e30, np.float32)  # x*x overflows float32 but not double
    assert py_sumsq(x) == pytest.approx(10 * np.float64(np.float32(3e30)) ** 2, rel=1e-15)


def test_vectorised_exp_is_within_2_ulp():
    from anecy._testing import py_expf
    x = np.concatenate([np.linspace(-87.3, 88.7, 2_000_001, dtype=np.float32),
                        np.array([0.0, -0.0, 1e-30, -1e-30, 88.72, -87.33], np.float32)])
    got = py_expf(x)
    want = np.exp(x.astype(np.float64)).astype(np.float32)
    ulps = np.abs(got.view(np.int32).astype(np.int64) - want.view(np.int32).astype(np.int64))
    assert ulps.max() <= 2
    assert np.isnan(py_expf(np.array([np.nan], np.float32))[0])
    edge = py_expf(np.array([89.0, 1e30, -88.0, -1e30, -np.inf, np.inf], np.float32))
    assert np.isinf(edge[0]) and np.isinf(edge[1]) and np.all(edge[2:5] == 0) and np.isinf(edge[5])


@pytest.mark.parametrize("where", ["grad_inf", "grad_nan", "grad_huge", "lr_huge", "param_nan",
                                   "v_inf"])
def test_adamw_reports_non_finite_state_in_the_same_pass(where):
    # every element position (vector body and scalar tail) and the engine's two-thread split
    from anecy import Model, ModelConfig
    engine = Model(ModelConfig(dim=32, hidden_dim=48, n_layers=1, n_heads=4, vocab_size=40,
                               seq_len=8)).engine
    for i in (0, 5, 16, 36):
        for run in ("ops", "engine"):
            rng = np.random.default_rng(i)
            p, g = randn(rng, 37, scale=0.1), randn(rng, 37, scale=1e-3)
            m, v = np.zeros_like(p), np.zeros_like(p)
            lr = 1e-3
            if where == "grad_inf":
                g[i] = np.inf
            elif where == "grad_nan":
                g[i] = np.nan
            elif where == "grad_huge":
                g[i] = 1e20  # finite, but its square is not: v overflows
            elif where == "lr_huge":
                lr = 1e38  # the decay factor and the step make p overflow
                p[i] = 1e10
            elif where == "param_nan":
                p[i] = np.nan
            else:
                v[i] = np.inf
            if run == "ops":
                assert py_adamw(p, g, m, v, lr, 0.9, 0.95, 1e-8, 0.1, 1) is True
            else:
                assert engine.adamw(p, g, m, v, 20, lr, 0.9, 0.95, 1e-8, 0.1, 1, 1.0) is True
    rng = np.random.default_rng(0)
    p, g = randn(rng, 37, scale=0.1), randn(rng, 37, scale=1e-3)
    assert py_adamw(p, g, np.zeros_like(p), np.zeros_like(p), 1e-3, 0.9, 0.95, 1e-8, 0.1,
                    1) is False
    assert engine.adamw(p, g, np.zeros_like(p), np.zeros_like(p), 20, 1e-3, 0.9, 0.95, 1e-8,
                        0.1, 2, 1.0) is False
