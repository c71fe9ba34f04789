"""The LoRA adapters' rank-R loops of the cpu backend (anecy/_lowrank.h, through the py_lora_*
entry points of anecy._testing) against float64 numpy, on both of their paths.

The loops hold up to 8 rows of the rank side in registers and stream 8 positions at a time,
so the shapes here take ranks below, at and across a block of 8 (1, 3, 8, 12, 19) and
sequence lengths with and without a tail past the last multiple of 8 (1, 7, 8, 13, 35).
Each result is held to a first-order float32 bound: K U times the float64 sum of the
magnitudes of its terms, times a small safety factor, K being the length of its sum.
tools/lowrank_check holds the same loops to the same bounds in C, also built for arm64 and
run under qemu, as the Macs' compiler lowers them.
"""
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest

from anecy._testing import (
    lowrank_choose,
    py_lora_back_in,
    py_lora_back_out,
    py_lora_down,
    py_lora_up,
)
from conftest import require_tool

U = 2.0 ** -24
TINY = 1e-30
SHAPES = [  # R, n_in, n_out, S
    (1, 5, 7, 1), (3, 24, 40, 7), (8, 40, 24, 8), (8, 64, 96, 35), (12, 33, 17, 13),
    (19, 24, 40, 16), (5, 17, 64, 3),
]
P = 0.3


@pytest.fixture(params=[1, 0], ids=["avx2-or-cpu-default", "portable"])
def path(request):
    chosen = lowrank_choose(request.param)
    yield chosen
    lowrank_choose(-1)


def lowbias32(x):
    x = x.astype(np.uint64)
    m = np.uint64(0xFFFFFFFF)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & m
    x ^= x >> np.uint64(16)
    return x


def keep_mask(key, threshold, n_in, S):
    """1.0 where element k * S + s of x [n_in, S] is kept, as _lowrank.h draws it."""
    if threshold == 0:
        return np.ones((n_in, S))
    idx = np.arange(n_in * S, dtype=np.uint64).reshape(n_in, S)
    return (lowbias32(idx ^ np.uint64(key)) >= threshold).astype(np.float64)


def dropout(p):
    """(threshold, keep_scale) of dropout probability p."""
    return (int(round(p * 2.0 ** 32)), 1.0 / (1.0 - p)) if p else (0, 1.0)


def rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def assert_within(ours, ref, magnitude, length, factor=4.0):
    bound = factor * length * U * magnitude + TINY
    err = np.abs(ours.astype(np.float64) - ref)
    assert (err <= bound).all(), f"worst excess {np.max(err / bound):.2f}x the bound"


@pytest.mark.parametrize("p", [0.0, P])
@pytest.mark.parametrize("R, n_in, n_out, S", SHAPES)
def test_forward_is_A_then_B(path, R, n_in, n_out, S, p):
    rng = np.random.default_rng(R * 1000 + S)
    A, B, x = rand(rng, R, n_in), rand(rng, n_out, R), rand(rng, n_in, S)
    threshold, keep = dropout(p)
    key = 0x9E3779B9
    xd = x.astype(np.float64) * keep_mask(key, threshold, n_in, S) * keep
    u = py_lora_down(A, x, key, threshold, keep)
    assert_within(u, A.astype(np.float64) @ xd, np.abs(A) @ np.abs(xd), n_in)
    y0 = rand(rng, n_out, S)
    y = y0.copy()
    py_lora_up(B, u, 0.75, y)
    u64 = u.astype(np.float64)
    assert_within(y, y0 + 0.75 * B.astype(np.float64) @ u64,
                  np.abs(y0) + 0.75 * np.abs(B) @ np.abs(u64), R + 1)
    again = y0.copy()
    py_lora_up(B, py_lora_down(A, x, key, threshold, keep), 0.75, again)
    assert np.array_equal(again, y), "the loops must repeat exactly"


@pytest.mark.parametrize("R, n_in, n_out, S", SHAPES)
def test_back_out_is_B_transposed_and_dB(path, R, n_in, n_out, S):
    rng = np.random.default_rng(R * 7 + n_out)
    B, dy, u = rand(rng, n_out, R), rand(rng, n_out, S), rand(rng, R, S)
    dB0 = rand(rng, n_out, R)
    dB = dB0.copy()
    v = py_lora_back_out(B, dy, u, 0.5, dB)
    B64, dy64, u64 = (a.astype(np.float64) for a in (B, dy, u))
    assert_within(v, B64.T @ dy64, np.abs(B64).T @ np.abs(dy64), n_out)
    assert_within(dB, dB0 + 0.5 * dy64 @ u64.T, np.abs(dB0) + 0.5 * np.abs(dy64) @ np.abs(u64).T,
                  S + 1)
    # v alone (the merged-weight backends queue dB elsewhere): the same v, u unread
    assert np.array_equal(py_lora_back_out(B, dy, None, 0.5, None), v)


@pytest.mark.parametrize("with_dx", [True, False])
@pytest.mark.parametrize("p", [0.0, P])
@pytest.mark.parametrize("ranks", [(8,), (3, 12, 1), (19, 8)])
@pytest.mark.parametrize("n_in, S", [(24, 13), (40, 8), (17, 1)])
def test_back_in_makes_each_sites_dA_and_their_summed_dx(path, ranks, n_in, S, p, with_dx):
    rng = np.random.default_rng(sum(ranks) * 31 + n_in + S)
    threshold, keep = dropout(p)
    x = rand(rng, n_in, S)
    A = [rand(rng, R, n_in) for R in ranks]
    v = [rand(rng, R, S) for R in ranks]
    dA0 = [rand(rng, R, n_in) for R in ranks]
    dA = [a.copy() for a in dA0]
    keys = [0x1234567 * (j + 1) & 0xFFFFFFFF for j in range(len(ranks))]
    dx0 = rand(rng, n_in, S)
    dx = dx0.copy() if with_dx else None
    py_lora_back_in(A, x, v, 0.25, dA, dx, keys, threshold, keep)
    x64 = x.astype(np.float64)
    ref_dx, mag_dx = dx0.astype(np.float64), np.abs(dx0).astype(np.float64)
    for j, R in enumerate(ranks):
        mask = keep_mask(keys[j], threshold, n_in, S)
        xd = x64 * mask * keep
        v64 = v[j].astype(np.float64)
        assert_within(dA[j], dA0[j] + 0.25 * v64 @ xd.T,
                      np.abs(dA0[j]) + 0.25 * np.abs(v64) @ np.abs(xd).T, S + 1)
        t = A[j].astype(np.float64).T @ v64
        ref_dx = ref_dx + 0.25 * keep * mask * t
        mag_dx = mag_dx + 0.25 * keep * mask * (np.abs(A[j]).T @ np.abs(v64))
    if with_dx:
        assert_within(dx, ref_dx, mag_dx, max(ranks) + len(ranks) + 1)


def test_both_paths_are_there():
    portable = lowrank_choose(0)
    chosen = lowrank_choose(-1)
    assert portable == "portable"
    assert chosen in ("avx2+fma", "portable")


def test_the_c_check_passes_natively_and_on_arm64():
    script = Path(__file__).resolve().parent.parent / "tools" / "lowrank_check" / "check.sh"
    install = "apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
    arm = platform.machine() in ("aarch64", "arm64")
    if not arm:
        require_tool("aarch64-linux-gnu-gcc", install, "to build the arm64 check of the loops")
        require_tool("qemu-aarch64", install, "to run the arm64 check of the loops")
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CC": os.environ.get("CC", "cc")})
    assert res.returncode == 0, res.stdout + res.stderr
    paths = [line.split(":")[0] for line in res.stdout.splitlines() if ": ok (" in line]
    assert "portable" in paths
    if not arm:     # this machine's paths, then arm64's portable one
        assert paths[-1] == "portable" and len(paths) >= 2, res.stdout
