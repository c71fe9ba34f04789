"""The Accelerate (vDSP/vForce) versions of RMSNorm and softmax cross-entropy (anecy/_accel.h).

On macOS they are what _ops runs. Here they run over anecy/_vdsp_portable.h (the vDSP
functions' documented semantics as plain loops), which tests their algebra against the
portable loops of _ops (fp32 sums against double sums: agreement to fp32 rounding); and
clang type-checks the Accelerate branch against a stub of the SDK's declarations
(tools/objc_check/check_accel.sh), including a deliberately broken copy it must reject."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from anecy._ops import ACCELERATE
from anecy._testing import (
    py_accel_rmsnorm_bwd,
    py_accel_rmsnorm_fwd,
    py_accel_softmax_xent,
    py_rmsnorm_bwd,
    py_rmsnorm_fwd,
    py_softmax_xent,
)
from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tools" / "objc_check" / "check_accel.sh"

SHAPES = [(768, 256), (64, 64), (37, 19), (2, 5), (128, 1)]
U = 2.0 ** -24          # fp32 unit roundoff


def rel(a, b, scale=None):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b)) if scale is None else scale
    return float(np.max(np.abs(a - b)) / max(scale, 1e-30))


def sum_bound(n):
    """Relative error allowed between an fp32 sum of n terms and a double one: a few
    units of roundoff times the typical growth sqrt(n) (the worst case is n)."""
    return 16 * U * np.sqrt(max(n, 1)) + 8 * U


def test_portable_build_does_not_use_accelerate():
    assert ACCELERATE is False


@pytest.mark.parametrize("C,S", SHAPES)
def test_rmsnorm_matches_the_portable_code(C, S):
    rng = np.random.default_rng(C * 1000 + S)
    x = (rng.standard_normal((C, S)) * 3).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(C)).astype(np.float32)
    dy = rng.standard_normal((C, S)).astype(np.float32)
    tol = sum_bound(C)
    assert rel(py_accel_rmsnorm_fwd(x, w, 1e-5), py_rmsnorm_fwd(x, w, 1e-5)) < tol
    dx, dw = py_accel_rmsnorm_bwd(x, w, dy, 1e-5)
    dx0, dw0 = py_rmsnorm_bwd(x, w, dy, 1e-5)
    # dx is a difference of two terms of this size (they cancel exactly when C = 1)
    inv = 1 / np.sqrt((x.astype(np.float64) ** 2).mean(axis=0) + 1e-5)
    scale = np.max(np.abs(inv * w[:, None] * dy))
    assert rel(dx, dx0, scale) < tol
    assert rel(dw, dw0) < sum_bound(S) + tol
    acc = rng.standard_normal((C, S)).astype(np.float32)
    dxa, _ = py_accel_rmsnorm_bwd(x, w, dy, 1e-5, acc.copy())
    assert rel(dxa, acc + dx0, scale) < tol + 4 * U


@pytest.mark.parametrize("S,V", [(256, 32000), (7, 97), (1, 1), (3, 2)])
def test_softmax_xent_matches_the_portable_code(S, V):
    rng = np.random.default_rng(S + V)
    logits = (rng.standard_normal((S, V)) * 4).astype(np.float32)
    targets = rng.integers(0, V, S).astype(np.int32)
    loss, d = py_accel_softmax_xent(logits, targets, 0.5)
    loss0, d0 = py_softmax_xent(logits, targets, 0.5)
    assert abs(loss - loss0) <= sum_bound(V) * S * max(abs(loss0) / S, 1.0)
    assert rel(d, d0) < sum_bound(V) + 8 * U
    # a gradient of a softmax sums to zero per row
    assert np.max(np.abs(d.astype(np.float64).sum(axis=1))) < 4 * sum_bound(V)


def _clang():
    path = require_tool("clang", "apt-get update && apt-get install -y clang",
                        "the Accelerate calls are type-checked with it")
    return path


def test_accelerate_calls_type_check_against_the_stub_sdk():
    _clang()
    proc = subprocess.run(["bash", str(CHECK)], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "check_accel: OK" in proc.stdout


def test_accelerate_check_rejects_a_wrong_call(tmp_path):
    _clang()
    tools = tmp_path / "tools" / "objc_check"
    tools.mkdir(parents=True)
    shutil.copy(CHECK, tools / CHECK.name)
    (tools / "sdk").symlink_to(CHECK.parent / "sdk")
    (tmp_path / "anecy").mkdir()
    shutil.copy(ROOT / "anecy" / "_blas.h", tmp_path / "anecy")
    shutil.copy(ROOT / "anecy" / "_vdsp_portable.h", tmp_path / "anecy")
    good = (ROOT / "anecy" / "_accel.h").read_text()
    for fix in (good, good.replace("vDSP_dotpr(t, 1, inv, 1, &r, n);",
                                   "vDSP_dotpr(t, 1, inv, 1, r, n);")):
        (tmp_path / "anecy" / "_accel.h").write_text(fix)
        proc = subprocess.run(["bash", str(tools / CHECK.name)], capture_output=True,
                              text=True, timeout=300, check=False)
        if fix is good:
            assert proc.returncode == 0, proc.stderr
        else:
            assert proc.returncode != 0 and "vDSP_dotpr" in proc.stderr, proc.stderr
