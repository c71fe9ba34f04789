"""The ane backend where there is no Apple Neural Engine (this is Linux x86_64).

What runs here: the runtime objects (_ane_runtime.Surface as an aligned host buffer, AneKernel
and ane_available() reporting why there is no ANE), backend selection, the proof that the
sim and ane backends share one staging path (anecy._packed.PackedKernels), and AneKernels'
own code -- compile once, one request per layer and kernel bound to the right Surfaces,
staging, evaluation through the C evaluator without the GIL, unstaging -- run end to end
with stand-ins for AneKernel that replace only the program execution: one executes the
MIL with anecy.milsim (it must give bit-identical results to the sim backend), one is a
C no-op (to show that the ane path never takes the GIL). Finally, the C that Cython
generates for _ane_runtime is type-checked against the real ane_shim.h (the macOS branch of
ane_platform.h). What is left is the shim itself on hardware.
"""
import ctypes
import gc
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from anecy import BackendUnavailable, ConfigError, Model, ModelConfig, _packed, backends, mil
from anecy._ane_runtime import (
    HOST_ALIGNMENT,
    SHIM_COMPILED,
    AneError,
    AneKernel,
    Surface,
    ane_available,
    compile_count,
)
from anecy._engine import CpuKernels, Kernels
from anecy._packed import AneKernels, PackedKernels, SimKernels
from anecy._testing import (
    NullAneKernel,
    PyAneKernel,
    hold_gil_until_calls,
    kernel_io,
    refuse_locks,
    run_kernel,
    stage,
)
from anecy.kernel_layout import KERNEL_NAMES, column_offsets, input_shape, output_shape
from anecy.milsim import Interpreter

ROOT = Path(__file__).resolve().parents[1]

KERNELS = ("sdpa_fwd", "wo_fwd", "ffn_fused", "ffn_bwd_w2t", "ffn_bwd_w13t", "wot_bwd",
           "sdpa_bwd1", "sdpa_bwd2", "q_bwd", "kv_bwd")

CONFIGS = {
    "gqa": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=24,
                vocab_size=97, seq_len=32),
    "qwen3": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                  vocab_size=97, seq_len=32, qk_norm=True, rope_style="half", rope_theta=1e6,
                  norm_eps=1e-6),
}


# -----------------------------------------------------------------------------------------
# the platform: no ANE here, and it says why
# -----------------------------------------------------------------------------------------

def test_ane_is_unavailable_here_with_a_reason():
    ok, why = ane_available()
    assert ok is False
    assert "macOS on Apple Silicon" in why and "Linux" in why, why
    assert SHIM_COMPILED is False
    assert compile_count() == 0


def test_backend_selection_without_an_ane():
    assert "ane" not in backends.available()
    assert backends.available() == ["cpu", "sim"]
    assert backends.resolve("auto") == "cpu"
    for call in (lambda: backends.resolve("ane"), lambda: backends.make_kernels("ane"),
                 lambda: Model(ModelConfig.preset("tiny"), backend="ane")):
        with pytest.raises(BackendUnavailable) as info:
            call()
        msg = str(info.value)
        assert "ane backend" in msg and "macOS on Apple Silicon" in msg, msg
        assert "\n" not in msg
    # the defaults the trainer reads stay as they are
    assert backends.DEFAULT_LOSS_SCALE["ane"] == backends.DEFAULT_LOSS_SCALE["sim"] == 4096.0
    assert backends.DEFAULT_ASYNC_DW["ane"] is True


def test_ane_kernel_compile_fails_clearly():
    prog = mil.generate("woFwd", ModelConfig(**CONFIGS["gqa"]))
    with pytest.raises(AneError, match="compiling woFwd for the ANE failed: .*macOS on Apple "
                                       "Silicon"):
        AneKernel(prog.text, prog.blobs, "woFwd")
    with pytest.raises(ValueError, match="non-empty"):
        AneKernel("", {}, "empty")
    with pytest.raises(ValueError, match="NUL"):
        AneKernel("program(1.3)\0", {}, "nul")
    assert compile_count() == 0     # the fallback never reaches a compiler
    assert issubclass(AneError, RuntimeError)


def test_ane_kernels_bind_fails_clearly_here():
    m = Model(ModelConfig(**CONFIGS["gqa"]), backend="sim")
    ane = AneKernels()
    with pytest.raises(BackendUnavailable, match="macOS on Apple Silicon") as info:
        ane.bind(m.engine)
    # the one line names the stage, the kernel, its shapes and the machine
    assert str(info.value).startswith("the ane backend could not compile and load sdpaFwd "
                                      "(every layer, input [1,64,1,")
    assert "no Neural Engine" in str(info.value) and "\n" not in str(info.value)


# -----------------------------------------------------------------------------------------
# Surface as a host buffer
# -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("nbytes", [1, 63, 64, 4096, 4097, 3 * 1024 * 1024 + 2])
def test_surface_is_an_aligned_zeroed_host_buffer(nbytes):
    s = Surface(nbytes)
    assert not s.is_iosurface
    assert s.nbytes == nbytes
    assert HOST_ALIGNMENT >= 64 and s.address % HOST_ALIGNMENT == 0 and s.address % 64 == 0
    view = s.array(np.uint8)
    assert view.shape == (nbytes,) and view.ctypes.data == s.address
    assert not view.any()
    assert memoryview(s).nbytes == nbytes and not memoryview(s).readonly


def test_surface_views_are_zero_copy():
    s = Surface(2 * 6 * 10)
    a = s.array(np.float16, (6, 10))
    b = s.array(np.float16, (6, 10))
    raw = s.array(np.uint8)
    assert a.dtype == np.float16 and a.flags.c_contiguous and a.flags.writeable
    assert np.shares_memory(a, b) and np.shares_memory(a, raw)
    vals = np.arange(60, dtype=np.float16).reshape(6, 10) / 8
    a[...] = vals
    assert np.array_equal(b, vals)                            # one memory, two views
    assert raw.tobytes() == vals.astype("<f2").tobytes()       # little-endian fp16 bytes
    raw[:2] = np.frombuffer(np.float16(-2.5).tobytes(), np.uint8)
    assert a[0, 0] == -2.5
    tail = s.array(np.float16, (5,), offset=100)
    assert np.shares_memory(tail, a) and tail[0] == a[5, 0]
    # a view keeps its Surface alive
    ref = weakref.ref(s)
    del s, b, raw, tail
    gc.collect()
    assert ref() is not None and a[0, 0] == -2.5
    del a
    gc.collect()
    assert ref() is None


def test_surface_rejects_bad_requests():
    with pytest.raises(ValueError):
        Surface(0)
    s = Surface(100)
    with pytest.raises(ValueError, match="needs 102 bytes"):
        s.array(np.float16, (51,))
    with pytest.raises(ValueError):
        s.array(np.float16, (2,), offset=1)        # misaligned for fp16
    with pytest.raises(ValueError):
        s.array(np.uint8, (1,), offset=101)
    assert s.array(np.float16).shape == (50,)


def test_surface_lock_nests_and_balances():
    s = Surface(256)
    assert s.locked == 0
    s.lock()
    with s:
        assert s.locked == 2
    assert s.locked == 1
    s.unlock()
    assert s.locked == 0
    with pytest.raises(RuntimeError, match="without a matching lock"):
        s.unlock()
    host = Surface(256, host=True)
    assert not host.is_iosurface


# -----------------------------------------------------------------------------------------
# sim and ane share one packing path
# -----------------------------------------------------------------------------------------

SHARED_METHODS = ("bind", "stage_all", "input_surface", "input_buffer", "output_surface",
                  "output_buffer", "raise_pending", "pending_error", "trace")


def _own_methods(cls):
    return {n for n, v in vars(cls).items() if not n.startswith("__") and callable(v)}


def _vtable(cls, n):
    """The first n function pointers of a Cython class's C method table."""
    cap = vars(cls)["__pyx_vtable__"]
    name = ctypes.pythonapi.PyCapsule_GetName
    name.restype, name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return list((ctypes.c_void_p * n).from_address(get(cap, name(cap))))


def test_sim_and_ane_inherit_every_packing_method():
    assert SimKernels.__mro__[1:3] == AneKernels.__mro__[1:3] == (PackedKernels, Kernels)
    # each backend defines exactly what differs: compile (here) and _execute (C, below);
    # the ane backend also runs one program as bound, for anecy selftest
    assert _own_methods(SimKernels) == {"compile_programs"}
    assert _own_methods(AneKernels) == {"compile_programs", "execute"}
    for name in SHARED_METHODS:
        assert name in vars(PackedKernels), name
        assert name not in vars(SimKernels) and name not in vars(AneKernels), name
        assert getattr(SimKernels, name) is getattr(AneKernels, name) \
            is getattr(PackedKernels, name), name


def test_engine_facing_kernel_methods_are_one_implementation():
    """The cdef methods the engine calls without the GIL (stage_weights, lora_fwd and the
    ten kernels, the first 12 slots of the C method table) and PackedKernels' own cdef
    methods (plan compilation, the call steps, the attention state, the error capture, the
    staging halves) are the same machine code for sim and ane, except _execute (slot 18),
    the one that differs; the cpu backend's kernels are different code (so the table is
    really read). lora_fwd (slot 1), the low-rank path, is the interface's own code on every
    backend (the packed ones never call it: they stage merged weights)."""
    n_engine = 12
    n_packed = n_engine + 24
    execute = n_engine + 6
    lora_fwd = 1
    packed = _vtable(PackedKernels, n_packed)
    sim, ane = _vtable(SimKernels, n_packed), _vtable(AneKernels, n_packed)
    assert all(packed)
    for i in range(n_packed):
        if i != execute:
            assert sim[i] == packed[i] == ane[i], i
    assert len({sim[execute], ane[execute], packed[execute]}) == 3
    cpu = _vtable(CpuKernels, n_engine)
    assert cpu[lora_fwd] == packed[lora_fwd] == _vtable(Kernels, n_engine)[lora_fwd]
    assert all(a != b for i, (a, b) in enumerate(zip(cpu, packed[:n_engine])) if i != lora_fwd)


@pytest.fixture(scope="module")
def sim_model():
    cfg = ModelConfig(**CONFIGS["qwen3"])
    m = Model(cfg, backend="sim", seed=1)
    return cfg, m


def test_sim_buffers_are_surfaces(sim_model):
    cfg, m = sim_model
    sim = m.engine.kernels
    seen = set()
    for name in KERNEL_NAMES:
        layers = range(cfg.n_layers) if name in _packed.WEIGHTED else [-1]
        for layer in layers:
            s = sim.input_surface(name, layer)
            buf = sim.input_buffer(name, layer)
            _, C, _, W = input_shape(name, cfg)
            assert isinstance(s, Surface) and s.nbytes == max(2 * C * W, 49152)
            assert buf.dtype == np.float16 and buf.shape == (C, W)
            assert buf.ctypes.data == s.address and np.shares_memory(buf, s.array(np.uint8))
            assert s.locked == 0
            seen.add(s.address)
        out = sim.output_surface(name)
        _, C2, _, S = output_shape(name, cfg)
        assert isinstance(out, Surface) and out.nbytes == max(2 * C2 * S, 49152)
        assert sim.output_buffer(name).ctypes.data == out.address
    # one input Surface per layer and weighted kernel, one per shared kernel
    assert len(seen) == cfg.n_layers * len(_packed.WEIGHTED) + len(_packed.SHARED)
    # the staged weight columns live in the Surface itself
    wo = m.views["model.layers.1.self_attn.o_proj.weight"]
    col0, cols = column_offsets("woFwd", cfg)["Wo"]
    staged = sim.input_surface("woFwd", 1).array(np.float16, input_shape("woFwd", cfg)[1::2])
    assert np.array_equal(staged[:, col0:col0 + cols], wo.T.astype(np.float16))
    assert sim.compile_ms > 0


# -----------------------------------------------------------------------------------------
# AneKernels' own code, with milsim standing in for the ANE
# -----------------------------------------------------------------------------------------

class FakeAneKernel(PyAneKernel):
    """AneKernel's interface (compile in the constructor, bind, evaluate), executing the MIL
    text with anecy.milsim on the bound Surfaces' memory, as the ANE would read and write
    the IOSurfaces. PyAneKernel's C evaluator calls evaluate() with the GIL."""
    compiles = 0
    fail_on = None           # a kernel name whose evaluation raises

    def __init__(self, text, blobs, name):
        super().__init__(text, blobs, name)
        type(self).compiles += 1
        self.program = Interpreter(text, blobs)
        self.in_shape = self.program.input_type.shape
        self.out_shape = self.program.output_type.shape
        self.requests = []

    def bind(self, inp, out):
        assert isinstance(inp, Surface) and isinstance(out, Surface)
        # the tensor at the start of each; surfaces are at least 49152 bytes (MIN_SURFACE_BYTES)
        assert inp.nbytes == max(2 * int(np.prod(self.in_shape)), _packed.MIN_SURFACE_BYTES)
        if self.name == "sdpaBwd1":      # its output Surface is sdpaBwd2's input Surface
            assert out.nbytes >= max(2 * int(np.prod(self.out_shape)), _packed.MIN_SURFACE_BYTES)
        else:
            assert out.nbytes == max(2 * int(np.prod(self.out_shape)),
                                     _packed.MIN_SURFACE_BYTES)
        req = super().bind(inp, out)
        self.requests.append(req)
        return req

    def evaluate(self, request):
        assert any(request is r for r in self.requests), "not one of this kernel's requests"
        inp, out = request.input, request.output
        assert inp.locked == 0 and out.locked == 0, "the ANE must not run on locked surfaces"
        if self.name == type(self).fail_on:
            raise AneError("(fake) Error Code=15")
        out.array(np.float16, self.out_shape)[...] = self.program.run(
            inp.array(np.float16, self.in_shape))


@pytest.fixture
def fake():
    _packed.clear_compiled_programs()
    cls = type("Fake", (FakeAneKernel,), {"compiles": 0, "fail_on": None})
    yield cls
    _packed.clear_compiled_programs()


def test_fake_ane_kernels_compile_once_and_bind_per_layer(sim_model, fake):
    cfg, m = sim_model
    ane = AneKernels(kernel_factory=fake)
    assert ane.backend == "ane" and ane.kernel_factory is fake
    ane.bind(m.engine)
    assert fake.compiles == 10 and sorted(ane.compiled) == sorted(KERNEL_NAMES)
    assert ane.compile_ms > 0
    for layer in range(cfg.n_layers):
        for name in _packed.WEIGHTED:
            req = ane.requests[layer][name]
            assert req.input is ane.input_surface(name, layer)
            assert req.output is ane.output_surface(name, layer)
    # sdpaFwd's output Surface is one per layer (it holds q, k, v for the backward); the
    # other kernels' are shared by the layers
    outs = {name: {ane.output_surface(name, l).address for l in range(cfg.n_layers)}
            for name in KERNEL_NAMES}
    assert {k for k, v in outs.items() if len(v) == cfg.n_layers} == {"sdpaFwd"}
    assert all(len(v) == 1 for k, v in outs.items() if k != "sdpaFwd")
    for name in _packed.SHARED:
        req = ane.shared_requests[name]
        assert req.input is ane.input_surface(name) and req.output is ane.output_surface(name)
    # a second model of the same shape reuses the compiled programs (the ~119 limit)
    again = AneKernels(kernel_factory=fake)
    again.bind(m.engine)
    assert fake.compiles == 10
    assert all(again.compiled[k] is ane.compiled[k] for k in KERNEL_NAMES)
    # rows narrower than 32 elements are refused before anything is compiled
    short = Model(ModelConfig(**dict(CONFIGS["gqa"], seq_len=16)), backend="sim")
    with pytest.raises(ConfigError, match="seq_len >= 32"):
        AneKernels(kernel_factory=fake).bind(short.engine)
    assert fake.compiles == 10
    # kernels refuse to run before their weights are staged
    with pytest.raises(RuntimeError, match="not staged"):
        run_kernel(ane, "wo_fwd", 0, attn=np.ones((cfg.q_dim, cfg.seq_len), np.float32))


@pytest.mark.parametrize("name", KERNELS)
def test_fake_ane_matches_sim_bit_for_bit(sim_model, fake, name):
    cfg, m = sim_model
    sim = m.engine.kernels
    ane = AneKernels(kernel_factory=fake)
    ane.bind(m.engine)
    stage(ane)
    ins, _ = kernel_io(sim, name)
    for layer in range(cfg.n_layers):
        rng = np.random.default_rng(10 * layer + KERNELS.index(name))
        a = {n: rng.standard_normal((c, cfg.seq_len)).astype(np.float32) for n, c in ins}
        got, want = run_kernel(ane, name, layer, **a), run_kernel(sim, name, layer, **a)
        assert sorted(got) == sorted(want)
        for out in want:
            assert np.all(np.isfinite(got[out])) and np.array_equal(got[out], want[out]), \
                (name, layer, out)
    assert ane.calls == cfg.n_layers and ane.io_ms > 0


def _ane_model(cfg, fake, monkeypatch, seed):
    """A Model on the ane backend, with the stand-in executing the programs."""
    monkeypatch.setattr(backends, "available", lambda: ["cpu", "sim", "ane"])
    real = backends.make_kernels
    monkeypatch.setattr(backends, "make_kernels",
                        lambda name: AneKernels(kernel_factory=fake) if name == "ane"
                        else real(name))
    return Model(cfg, backend="ane", seed=seed)


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
def test_fake_ane_training_step_equals_sim(cfg_name, fake, monkeypatch):
    cfg = ModelConfig(**CONFIGS[cfg_name])
    sim = Model(cfg, backend="sim", seed=5)
    ane = _ane_model(cfg, fake, monkeypatch, seed=5)
    assert isinstance(ane.engine.kernels, AneKernels) and ane.engine.async_dw
    rng = np.random.default_rng(0)
    for _ in range(2):
        x = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
        y = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
        ls = sim.forward_backward(x, y, 4096.0)
        la = ane.forward_backward(x, y, 4096.0)
        assert np.isfinite(la) and la == ls
        assert np.array_equal(ane.grads, sim.grads)
        for model in (sim, ane):             # an update, restaged through stage_weights
            model.params -= 1e-3 * np.sign(model.grads)
            model.zero_grad()
            model.weights_changed()
    assert np.array_equal(ane.params, sim.params)
    assert fake.compiles == 10
    # q, k, v went from sdpaFwd's Surfaces to sdpaBwd1/2's in fp16, every layer and step
    assert ane.engine.kernels.holds_qkv == [True] * cfg.n_layers
    assert ane.engine.kernels.held_calls == 2 * 2 * cfg.n_layers


def test_held_qkv_surface_that_will_not_lock(fake, monkeypatch):
    """sdpaBwd1 copies its layer's q, k, v from that layer's sdpaFwd output Surface: when
    that Surface will not lock, the error names sdpaBwd1, the step's gradients are NaN, and
    the next step is whole again."""
    cfg = ModelConfig(**CONFIGS["gqa"])
    m = _ane_model(cfg, fake, monkeypatch, seed=0)
    k = m.engine.kernels
    x = np.arange(cfg.seq_len, dtype=np.int32) % cfg.vocab_size
    held = k.output_surface("sdpaFwd", cfg.n_layers - 1)
    evaluate = fake.evaluate

    def refusing(self, request):
        evaluate(self, request)
        if self.name == "wotBwd":        # the call just before the backward's first sdpaBwd1
            refuse_locks(held)

    monkeypatch.setattr(fake, "evaluate", refusing)
    with pytest.raises(RuntimeError, match="could not lock sdpaFwd's output Surface") as info:
        m.forward_backward(x, x)
    assert any("ane backend's sdpaBwd1" in n
               for n in getattr(info.value, "__notes__", [])) or sys.version_info < (3, 11)
    assert np.isnan(m.grads).any()
    refuse_locks(held, False)
    monkeypatch.setattr(fake, "evaluate", evaluate)
    m.zero_grad()
    m.forward_backward(x, x)
    assert np.all(np.isfinite(m.grads)) and k.pending_error is None


def test_fake_ane_errors_surface_like_sim(fake, monkeypatch):
    cfg = ModelConfig(**CONFIGS["gqa"])
    m = _ane_model(cfg, fake, monkeypatch, seed=0)
    x = np.arange(cfg.seq_len, dtype=np.int32) % cfg.vocab_size
    fake.fail_on = "ffnBwdW13t"
    with pytest.raises(AneError, match="Error Code=15") as info:
        m.forward_backward(x, x)
    assert np.isnan(m.grads).any()
    assert any("ane backend's ffnBwdW13t (layer 1)" in n
               for n in getattr(info.value, "__notes__", [])) or sys.version_info < (3, 11)
    fake.fail_on = None
    m.zero_grad()
    assert np.isfinite(m.forward_backward(x, x))
    m.engine.kernels.raise_pending()


def _null_model(cfg, monkeypatch, seed=0, delay_us=0.0):
    """A Model on the ane backend whose programs are NullAneKernels (C, no GIL)."""
    _packed.clear_compiled_programs()
    monkeypatch.setattr(backends, "available", lambda: ["cpu", "sim", "ane"])
    real = backends.make_kernels
    monkeypatch.setattr(backends, "make_kernels",
                        lambda name: AneKernels(kernel_factory=NullAneKernel) if name == "ane"
                        else real(name))
    m = Model(cfg, backend="ane", seed=seed)
    for k in m.engine.kernels.compiled.values():
        k.delay_us = delay_us
    return m


def _calls_while_the_gil_is_held(m, timeout_s):
    """Start a forward+backward on another thread; once it has run a kernel call, hold the
    GIL (a C busy loop that never releases it) until it has run all of them or timeout_s
    has passed. Returns (calls when the hold began, calls when it ended, calls per step)."""
    cfg = m.config
    k = m.engine.kernels
    x = np.arange(cfg.seq_len, dtype=np.int32) % cfg.vocab_size
    per_step = 10 * cfg.n_layers
    start = k.calls
    t = threading.Thread(target=m.forward_backward, args=(x, x))
    t.start()
    deadline = time.monotonic() + 30
    while k.calls == start and t.is_alive() and time.monotonic() < deadline:
        time.sleep(1e-4)             # sleeping releases the GIL
    assert k.calls > start, "the step never ran a kernel call"
    began = k.calls - start
    ended = hold_gil_until_calls(k, start + per_step, timeout_s) - start
    t.join()
    m.engine.kernels.raise_pending()
    return began, ended, per_step


def test_the_ane_path_never_takes_the_gil(monkeypatch):
    """While this thread holds the GIL without ever releasing it, a forward+backward on the
    ane backend (every kernel call: staging, C evaluation, unstaging) runs to the end on
    another thread. The same harness stops the sim backend dead (its executor needs the
    GIL), which shows that the check can fail."""
    cfg = ModelConfig(**dict(CONFIGS["gqa"], n_layers=4))
    ane = _null_model(cfg, monkeypatch, delay_us=5000)    # ~0.2 s a step: time to catch it
    began, ended, per_step = _calls_while_the_gil_is_held(ane, timeout_s=20)
    assert began < per_step // 2, "the step ended before the GIL was taken: inconclusive"
    assert ended == per_step, (began, ended)
    sim = Model(cfg, backend="sim")
    began, ended, per_step = _calls_while_the_gil_is_held(sim, timeout_s=1.0)
    assert ended - began <= 1 and ended < per_step, (began, ended)


def test_null_ane_errors_name_kernel_and_layer(monkeypatch):
    """A failed evaluation (its text captured in C) and a Surface that will not lock (an
    error inside a plan) both reach raise_pending() naming the kernel and layer; the
    step's gradients are NaN; the backend recovers."""
    cfg = ModelConfig(**CONFIGS["gqa"])
    m = _null_model(cfg, monkeypatch)
    k = m.engine.kernels
    x = np.arange(cfg.seq_len, dtype=np.int32) % cfg.vocab_size
    k.compiled["kvBwd"].fail_with("Error Code=15 (null)")
    with pytest.raises(AneError, match=r"kvBwd \(layer 1\): ANE evaluation failed: Error "
                                       r"Code=15 \(null\)") as info:
        m.forward_backward(x, x)
    assert np.isnan(m.grads).any()
    assert any("ane backend's kvBwd (layer 1)" in n
               for n in getattr(info.value, "__notes__", [])) or sys.version_info < (3, 11)
    k.compiled["kvBwd"].fail_with(None)
    m.zero_grad()
    m.forward_backward(x, x)
    assert np.all(np.isfinite(m.grads))
    refuse_locks(k.output_surface("woFwd"))
    with pytest.raises(RuntimeError, match="could not lock the output Surface") as info:
        m.forward_backward(x, x)
    assert any("ane backend's woFwd (layer 0)" in n
               for n in getattr(info.value, "__notes__", [])) or sys.version_info < (3, 11)
    refuse_locks(k.output_surface("woFwd"), False)
    m.zero_grad()
    m.forward_backward(x, x)
    assert k.pending_error is None


def test_kernel_factory_must_make_ane_kernels(sim_model):
    _packed.clear_compiled_programs()
    _, m = sim_model
    with pytest.raises(TypeError, match="not an AneKernel"):
        AneKernels(kernel_factory=lambda text, blobs, name: object()).bind(m.engine)
    _packed.clear_compiled_programs()


# -----------------------------------------------------------------------------------------
# the C Cython generates for _ane_runtime, against the real shim header
# -----------------------------------------------------------------------------------------

def test_ane_runtime_c_type_checks_against_the_real_shim_header(tmp_path):
    """ane_platform.h includes ane_shim.h when __APPLE__ is defined: the C generated for
    _ane_runtime.pyx must compile against the shim's real declarations (argument types,
    constness, return types), not only against this platform's fallbacks."""
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    assert shutil.which(cc), f"no C compiler {cc!r}"
    out = tmp_path / "_ane_runtime.c"
    subprocess.run([sys.executable, "-m", "cython", "-3", "-I", str(ROOT / "anecy"),
                    str(ROOT / "anecy" / "_ane_runtime.pyx"), "-o", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    # __linux__ stays defined: Debian's Python.h finds its pyconfig.h through it, and
    # ane_platform.h looks at __APPLE__ first
    flags = ["-D__APPLE__", "-I", sysconfig.get_paths()["include"],
             "-I", str(ROOT / "anecy"), "-I", str(ROOT / "anecy" / "objc")]
    proc = subprocess.run([cc, "-fsyntax-only", "-Wall", "-Wextra", "-Wno-unused-parameter",
                           "-Wno-unused-function", "-Werror", *flags, str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # and it really was the shim's header: its declarations, none of the fallbacks
    pre = subprocess.run([cc, "-E", *flags, str(out)], capture_output=True, text=True,
                         timeout=300)
    assert pre.returncode == 0, pre.stderr[-3000:]
    assert "objc/ane_shim.h" in pre.stdout
    assert "anecy_ane_kernel *anecy_ane_compile(" in pre.stdout
    assert "static inline int anecy_ane_available" not in pre.stdout
