"""float32 <-> float16 conversion (anecy/_fp16.h via anecy._ops) must match
numpy's astype bit for bit, on the dispatching SIMD path and the scalar path."""
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest

from anecy._ops import f16_to_f32, f32_to_f16, f32_to_f16_transposed, fp16_path
from conftest import require_tool

SIMD = pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])

U32_BITS = [
    0x00000000, 0x80000000, 0x7F800000, 0xFF800000,  # signed zeros, Inf
    # quiet NaNs
    0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7FC02000, 0x7FE00000, 0x7FFFFFFF, 0xFFFFFFFF,
    # signalling
    0x7F800001, 0xFF800001, 0x7FA00000, 0x7FBFFFFF, 0x7F802000, 0x7F801FFF, 0xFFA5A5A5,
    0x00000001, 0x80000001, 0x007FFFFF, 0x00800000,  # float32 subnormals, smallest normal
    0x477FE000, 0x477FEFFF, 0x477FF000, 0x477FF001, 0x47800000,  # 65504, 65520 and around it
    0xC77FEFFF, 0xC77FF000, 0x7F7FFFFF, 0xFF7FFFFF,
]


def bits32(x):
    return np.asarray(x, dtype=np.uint32).view(np.float32)


def ours_f16(x, simd):
    out = np.empty(len(x), np.uint16)
    f32_to_f16(x, out, simd=simd)
    return out


def ours_f32(h, simd):
    out = np.empty(len(h), np.float32)
    f16_to_f32(h, out, simd=simd)
    return out.view(np.uint32)


def numpy_f16(x):
    with np.errstate(all="ignore"):
        return x.astype(np.float16).view(np.uint16)


def numpy_f32(h):
    return h.view(np.float16).astype(np.float32).view(np.uint32)


def assert_same(got, want, src):
    bad = np.flatnonzero(got != want)
    if bad.size:
        i = bad[0]
        src_bits = src.view(np.uint32 if src.dtype == np.float32 else np.uint16)
        raise AssertionError(
            f"{bad.size} of {len(src)} differ; first at {i}: input {int(src_bits[i]):#x} "
            f"-> {int(got[i]):#x}, numpy gives {int(want[i]):#x}"
        )


def check_f16(x, simd):
    assert_same(ours_f16(x, simd), numpy_f16(x), x)


def check_f32(h, simd):
    assert_same(ours_f32(h, simd), numpy_f32(h), h)


def test_path_name():
    path = fp16_path()
    assert path in ("f16c", "neon", "scalar")
    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        assert path == "neon"
    elif machine == "x86_64" and os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
        if "f16c" in flags and "avx" in flags:
            assert path == "f16c"


@SIMD
def test_all_half_patterns_and_round_trip(simd):
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    check_f32(h, simd)
    f = ours_f32(h, simd).view(np.float32)
    check_f16(f, simd)
    assert_same(ours_f16(f, simd), h, f)  # every half, NaN payloads included, survives the trip


@SIMD
def test_special_values(simd):
    base = bits32(U32_BITS)
    x = np.concatenate([base, -base[:4], np.float32([
        65504, 65519.996, 65520, 65520.004, 65536, 1e38,
        2.0**-24, 2.0**-25, 3 * 2.0**-25, 5 * 2.0**-25, 1023 * 2.0**-24, 1023.5 * 2.0**-24,
        2.0**-14,
        np.nextafter(np.float32(2.0**-25), np.float32(0)),
        np.nextafter(np.float32(2.0**-25), np.float32(1)),
        0.1, 1 / 3, 1.0, -2.5,
    ])])
    x = np.concatenate([x, -x])
    # every rotation, so that each value (NaNs too) sits in every vector lane
    x = np.concatenate([np.roll(x, k) for k in range(17)])
    check_f16(x, simd)
    check_f32(numpy_f16(x), simd)


@SIMD
def test_ties_at_every_exponent(simd):
    # midpoints between every pair of adjacent finite halves (exact in float32:
    # they need 12 significant bits), and the float32 values either side
    h = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)
    mid = ((h[:-1] + h[1:]) / 2).astype(np.float32)
    assert np.all(mid.astype(np.float64) == (h[:-1] + h[1:]) / 2)
    up = np.nextafter(mid, np.float32(np.inf))
    down = np.nextafter(mid, np.float32(0))
    x = np.concatenate([mid, up, down])
    check_f16(np.concatenate([x, -x]), simd)


@SIMD
def test_strided_float32_sweep(simd):
    step, chunk = 251, 1 << 22
    for lo in range(0, 1 << 32, step * chunk):
        hi = min(lo + step * chunk, 1 << 32)
        x = np.arange(lo, hi, step, dtype=np.uint64).astype(np.uint32).view(np.float32)
        check_f16(x, simd)


@SIMD
def test_random(simd):
    rng = np.random.default_rng(1234)
    for scale in (1e-8, 1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 6e4):
        check_f16((rng.standard_normal(100_000) * scale).astype(np.float32), simd)
    check_f16(rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint32).view(np.float32), simd)
    check_f32(rng.integers(0, 1 << 16, 1 << 20, dtype=np.uint16), simd)


@SIMD
def test_lengths_and_offsets(simd):
    rng = np.random.default_rng(7)
    pool = np.concatenate([bits32(U32_BITS), (rng.standard_normal(200) * 1e3).astype(np.float32)])
    src32 = rng.permutation(pool)[:120]
    src16 = numpy_f16(src32)
    sentinel = 0xA5A5
    for off in range(17):
        for n in range(71):
            x, h = src32[off:off + n], src16[off:off + n]
            buf16 = np.full(n + 40, sentinel, np.uint16)
            f32_to_f16(x, buf16[off + 3:off + 3 + n], simd=simd)
            assert_same(buf16[off + 3:off + 3 + n], numpy_f16(x), x)
            assert np.all(buf16[:off + 3] == sentinel) and np.all(buf16[off + 3 + n:] == sentinel)
            buf32 = np.full(n + 40, sentinel, np.uint32)
            f16_to_f32(h, buf32[off + 1:off + 1 + n].view(np.float32), simd=simd)
            assert_same(buf32[off + 1:off + 1 + n], numpy_f32(h), h)
            assert np.all(buf32[:off + 1] == sentinel) and np.all(buf32[off + 1 + n:] == sentinel)


@SIMD
def test_length_mismatch_raises(simd):
    with pytest.raises(ValueError):
        f32_to_f16(np.zeros(5, np.float32), np.zeros(4, np.uint16), simd=simd)
    with pytest.raises(ValueError):
        f16_to_f32(np.zeros(4, np.uint16), np.zeros(5, np.float32), simd=simd)


# -- the transposed conversion (weight staging of the weights a kernel reads transposed) --
@SIMD
@pytest.mark.parametrize("rows, cols", [(1, 1), (7, 9), (8, 8), (33, 31), (64, 40), (65, 97),
                                        (4, 100), (200, 72)])
def test_transposed_matches_numpy(simd, rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols)
    # each side with a row stride of its own (views into wider arrays), as in a Surface
    wide = rng.standard_normal((cols, rows + 5)).astype(np.float32) * 300
    specials = bits32(U32_BITS)
    at = rng.integers(0, wide.size, size=min(wide.size // 4 + 1, len(specials)))
    wide.reshape(-1)[at] = specials[:len(at)]
    src = wide[:, 2:2 + rows]
    out = np.full((rows, cols + 3), 0xCDCD, np.uint16)
    f32_to_f16_transposed(src, out[:, 1:1 + cols], simd=simd)
    want = numpy_f16(np.ascontiguousarray(src.T).reshape(-1)).reshape(rows, cols)
    np.testing.assert_array_equal(out[:, 1:1 + cols], want)
    assert np.all(out[:, 0] == 0xCDCD) and np.all(out[:, 1 + cols:] == 0xCDCD)


def test_transposed_checks_its_arrays():
    with pytest.raises(ValueError, match="transpose"):
        f32_to_f16_transposed(np.zeros((3, 4), np.float32), np.zeros((3, 4), np.uint16))
    with pytest.raises(ValueError, match="contiguous"):
        f32_to_f16_transposed(np.zeros((4, 6), np.float32)[:, ::2],
                              np.zeros((3, 4), np.uint16))


def test_c_vector_paths_match_the_scalar_reference_natively_and_on_arm64(tmp_path):
    """tools/fp16_check: the vector paths against the scalar reference in C, built for
    this machine and (elsewhere than arm64) cross-built for arm64 and run under qemu, so
    the NEON path the Macs take is checked too."""
    script = Path(__file__).resolve().parent.parent / "tools" / "fp16_check" / "check.sh"
    install = "apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross"
    if platform.machine() not in ("aarch64", "arm64"):
        require_tool("aarch64-linux-gnu-gcc", install, "to build the NEON path's check")
        require_tool("qemu-aarch64", install, "to run the NEON path's check")
    res = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "CC": os.environ.get("CC", "cc")})
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.split("\n")
    assert any(line.startswith(f"{fp16_path()}: ok") for line in lines), res.stdout
    if platform.machine() not in ("aarch64", "arm64"):
        assert any(line.startswith("neon: ok") for line in lines), res.stdout
