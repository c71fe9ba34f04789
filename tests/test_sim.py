"""The sim backend: the ANE's MIL programs run by anecy.milsim behind the Kernels interface.

Oracle: the cpu backend (fp32) on the same inputs and weights, kernel by kernel and for a
whole training step; then loss scaling in fp16, training, and the command line."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anecy import Model, ModelConfig, backends
from anecy._engine import CpuKernels
from anecy._packed import METHODS, SimKernels
from anecy._testing import kernel_io, refuse_locks, run_kernel, stage
from anecy.corpus import builtin_tokens
from anecy.data import VocabMap
from anecy.trainer import TrainConfig, Trainer
from fp16_bounds import TOLERANCE as MIL_TOLERANCE
from fp16_bounds import U, max_rel_err

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {
    # two layers each, so that the per-layer input buffers (and their staging) are exercised
    "mha": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, vocab_size=97, seq_len=32),
    # GQA 4:1 with head_dim != dim / n_heads and the seeds' residual scale
    "gqa": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=24,
                vocab_size=97, seq_len=32, residual_scale=0.5),
    # Qwen3-shaped: QK-norm, half RoPE, theta 1e6, eps 1e-6, head_dim != dim / n_heads
    "qwen3": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32,
                  vocab_size=97, seq_len=32, qk_norm=True, rope_style="half", rope_theta=1e6,
                  norm_eps=1e-6),
}

KERNELS = ("sdpa_fwd", "wo_fwd", "ffn_fused", "ffn_bwd_w2t", "ffn_bwd_w13t", "wot_bwd",
           "sdpa_bwd1", "sdpa_bwd2", "q_bwd", "kv_bwd")

# The static loss scale recommended for fp16 backends (see test_loss_scale_sweep).
RECOMMENDED_LOSS_SCALE = 4096.0

# Error = max |sim - cpu| / max |cpu| per output block. cpu is fp32, i.e. exact at this
# resolution (its own error is ~1e-7, 1/5000 of U), so the bounds are those fp16_bounds.py
# derives for every kernel against a float64 reference.
TOLERANCE = {method: MIL_TOLERANCE[kernel] for method, kernel in METHODS.items()}



def cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def sim_and_cpu(fields, seed=0):
    """A sim Model whose weights are O(1)-producing (weights ~ N(0, 1/in), norm weights
    around 1), and a CpuKernels bound to the same engine (so the same weights)."""
    cfg = ModelConfig(**fields)
    model = Model(cfg, backend="sim")
    rng = np.random.default_rng(seed)
    for name, view in model.views.items():
        if view.ndim == 2:
            gain = 2.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
            view[...] = gain * rng.standard_normal(view.shape) / np.sqrt(view.shape[1])
        else:
            view[...] = 1 + 0.3 * rng.standard_normal(view.shape)
    model.weights_changed()           # restages the sim's fp16 weight columns
    cpu = CpuKernels()
    cpu.bind(model.engine)
    return cfg, model, cpu


def kernel_inputs(cpu, cfg, name, layer, rng):
    """Inputs of realistic scale, as kernel_cases.py draws them: activations ~ N(0, 1), q and k
    with gain 2 so that the attention is clearly non-uniform."""
    ins, _ = kernel_io(cpu, name)
    S = cfg.seq_len
    a = {n: rng.standard_normal((c, S)).astype(np.float32) for n, c in ins}
    if name in ("sdpa_bwd1", "sdpa_bwd2"):
        a["q"] *= 2
        a["k_rep"] *= 2
    if name == "sdpa_bwd2":
        # real probabilities; dprobs ~ N(0, 4) as in kernel_cases.py
        a["probs"] = run_kernel(cpu, "sdpa_bwd1", layer, q=a["q"], k_rep=a["k_rep"],
                                v_rep=a["q"], da=a["q"])["probs"]
        a["dprobs"] *= 2
    return a


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def bound(request):
    cfg, model, cpu = sim_and_cpu(CONFIGS[request.param])
    return request.param, cfg, model, cpu


# -----------------------------------------------------------------------------------------
# backend selection
# -----------------------------------------------------------------------------------------

def test_sim_is_available_but_never_auto():
    assert backends.available()[:2] == ["cpu", "sim"]
    assert backends.resolve("auto") == "cpu"
    assert backends.resolve("sim") == "sim"
    assert isinstance(backends.make_kernels("sim"), SimKernels)
    m = Model(ModelConfig(**CONFIGS["mha"]), backend="sim")
    assert m.backend == "sim" and isinstance(m.engine.kernels, SimKernels)


# -----------------------------------------------------------------------------------------
# each kernel, sim against cpu
# -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", KERNELS)
def test_kernel_matches_cpu(bound, name):
    cfg_name, cfg, model, cpu = bound
    sim = model.engine.kernels
    for layer in range(cfg.n_layers):
        rng = np.random.default_rng(100 * layer + KERNELS.index(name))
        a = kernel_inputs(cpu, cfg, name, layer, rng)
        want = run_kernel(cpu, name, layer, **a)
        got = run_kernel(sim, name, layer, **a)
        assert sorted(got) == sorted(want) == sorted(n for n, _ in kernel_io(cpu, name)[1])
        if cfg.qk_norm and name == "sdpa_fwd":
            assert {"q_pre", "k_pre"} <= set(got)
        for out, ref in want.items():
            assert np.all(np.isfinite(got[out])), (cfg_name, name, out)
            err = max_rel_err(got[out], ref)
            assert err <= TOLERANCE[name], (cfg_name, name, layer, out, err / U)


def test_staged_weights_follow_updates(bound):
    """A weight change reaches the sim's kernels only through stage_weights, and then
    exactly: its staged fp16 columns are the only copy it computes from."""
    _, cfg, model, cpu = bound
    sim = model.engine.kernels
    rng = np.random.default_rng(7)
    dy = rng.standard_normal((cfg.dim, cfg.seq_len)).astype(np.float32)
    name = "model.layers.1.self_attn.o_proj.weight"
    old = model.views[name].copy()
    before = run_kernel(sim, "wot_bwd", 1, dy=dy)["da"]
    try:
        model.views[name][...] *= -1
        assert np.array_equal(run_kernel(sim, "wot_bwd", 1, dy=dy)["da"], before)   # not staged
        stage(sim)
        after = run_kernel(sim, "wot_bwd", 1, dy=dy)["da"]
        assert np.array_equal(after, -before)
        assert max_rel_err(after, run_kernel(cpu, "wot_bwd", 1, dy=dy)["da"]) <= 4 * U
    finally:
        model.views[name][...] = old
        model.weights_changed()


# -----------------------------------------------------------------------------------------
# a whole step
# -----------------------------------------------------------------------------------------

def corpus_batch(cfg, start=1000):
    toks = np.asarray(builtin_tokens())
    vm = VocabMap.from_tokens(toks, cfg.vocab_size)
    S = cfg.seq_len
    return vm, toks[start:start + S].astype(np.int32), vm.compact(toks[start + 1:start + 1 + S])


@pytest.mark.parametrize("cfg_name", ["tiny", "gqa", "qwen3"])
def test_forward_backward_matches_cpu(cfg_name):
    if cfg_name == "tiny":
        cfg = ModelConfig.preset("tiny")
    else:
        cfg = ModelConfig(**dict(CONFIGS[cfg_name], vocab_size=32000, seq_len=48))
    vm, x, y = corpus_batch(cfg)
    models = {}
    for backend in ("cpu", "sim"):
        m = Model(cfg, backend=backend, seed=3)
        m.set_active_vocab(vm.active_ids)
        loss = m.forward_backward(x, y, RECOMMENDED_LOSS_SCALE)
        if backend == "sim":
            m.engine.kernels.raise_pending()
        models[backend] = (m, loss)
    (mc, lc), (ms, ls) = models["cpu"], models["sim"]
    assert math.isfinite(ls) and abs(ls - lc) <= 1e-2 * abs(lc), (ls, lc)
    gc, gs = mc.hf_grads(), ms.hf_grads()
    assert sorted(gc) == sorted(gs)
    for name in gc:
        assert np.all(np.isfinite(gs[name])), name
        assert cosine(gs[name], gc[name]) > 0.99, (name, cosine(gs[name], gc[name]))
    # logits (the forward alone) agree too
    assert max_rel_err(ms.logits(x), mc.logits(x)) < 1e-2


def test_kernel_errors_surface():
    """A failure inside a noexcept kernel is kept, poisons the step (the failing call's
    outputs and every later call's are NaN: here a backward kernel, so the gradients), and
    is re-raised by the Model as soon as the engine returns; afterwards the backend works
    again."""
    cfg = ModelConfig(**CONFIGS["mha"])
    m = Model(cfg, backend="sim")
    sim = m.engine.kernels
    x = np.arange(cfg.seq_len, dtype=np.int32) % cfg.vocab_size

    class Broken:
        def run(self, buf):
            raise FloatingPointError("boom")

    good = sim.programs["ffnBwdW2t"]
    sim.programs["ffnBwdW2t"] = Broken()
    try:
        with pytest.raises(FloatingPointError, match="boom") as info:
            m.forward_backward(x, x)
        assert np.isnan(m.grads).any()
        assert any("ffnBwdW2t (layer 1)" in n for n in getattr(info.value, "__notes__", [])) \
            or sys.version_info < (3, 11)
        assert sim.pending_error is None
        with pytest.raises(FloatingPointError):   # the test hook re-raises by itself
            run_kernel(sim, "ffn_bwd_w2t", 0, dffn=np.zeros((cfg.dim, cfg.seq_len), np.float32))
    finally:
        sim.programs["ffnBwdW2t"] = good
    m.zero_grad()
    assert math.isfinite(m.forward_backward(x, x))
    sim.raise_pending()   # nothing pending


def test_failed_staging_is_never_run_on():
    cfg = ModelConfig(**CONFIGS["gqa"])
    m = Model(cfg, backend="sim")
    sim = m.engine.kernels
    attn = np.ones((cfg.q_dim, cfg.seq_len), np.float32)
    surface = sim.input_surface("ffnBwdW13t", 1)
    refuse_locks(surface)                 # one layer's weights cannot be staged
    with pytest.raises(RuntimeError, match="could not lock an input Surface") as info:
        m.weights_changed()               # raised as soon as the engine's call returns
    assert any("sim backend's stage_weights" in n for n in getattr(info.value, "__notes__", [])) \
        or sys.version_info < (3, 11)
    assert sim.pending_error is None
    with pytest.raises(RuntimeError, match="not staged") as info:
        run_kernel(sim, "wo_fwd", 0, attn=attn)
    assert any("woFwd (layer 0)" in n for n in getattr(info.value, "__notes__", [])) \
        or sys.version_info < (3, 11)
    refuse_locks(surface, False)
    m.weights_changed()
    sim.raise_pending()
    assert np.all(np.isfinite(run_kernel(sim, "wo_fwd", 0, attn=attn)["o"]))


# -----------------------------------------------------------------------------------------
# loss scaling
# -----------------------------------------------------------------------------------------

BACKWARD = ("ffnBwdW2t", "ffnBwdW13t", "wotBwd", "sdpaBwd1", "sdpaBwd2", "qBwd", "kvBwd")


def backward_fp16_stats(model, cpu, x, y, scale):
    """One sim step with every kernel call traced; each backward call is replayed through
    the cpu kernels on the very same inputs. Returns, over every gradient the backward
    kernels output (probs excluded): the share of entries that are exactly 0 in sim but not
    in cpu (underflow), the share of nonzero cpu entries below fp16's smallest normal 2^-14
    (where fp16 keeps fewer than 11 bits), the largest |gradient| and the non-finite count."""
    sim = model.engine.kernels
    model.zero_grad()
    sim.trace = []
    try:
        model.forward_backward(x, y, scale)
        trace = sim.trace
    finally:
        sim.trace = None
    sim.raise_pending()
    lost = small = total = nonfinite = 0
    biggest = 0.0
    for kernel, layer, ins, outs in trace:
        if kernel not in BACKWARD:
            continue
        ref = run_kernel(cpu, kernel, max(layer, 0), **ins)
        for name, got in outs.items():
            if name == "probs":
                continue
            want = ref[name]
            nz = want != 0
            lost += int(np.sum((got == 0) & nz))
            small += int(np.sum(nz & (np.abs(want) < 2.0 ** -14)))
            total += int(np.sum(nz))
            nonfinite += int(np.sum(~np.isfinite(got)))
            biggest = max(biggest, float(np.max(np.abs(want))))
    return lost / total, small / total, biggest, nonfinite


@pytest.fixture(scope="module")
def tiny_sim():
    """The tiny preset as the trainer builds it (llama2.c init, vocabulary compacted to the
    built-in corpus): a realistic small-gradient setting."""
    cfg = ModelConfig.preset("tiny")
    vm, x, y = corpus_batch(cfg)
    model = Model(cfg, backend="sim")
    model.set_active_vocab(vm.active_ids)
    cpu = CpuKernels()
    cpu.bind(model.engine)
    return model, cpu, x, y


def test_fp16_gradients_underflow_without_loss_scaling(tiny_sim):
    model, cpu, x, y = tiny_sim
    lost, small, biggest, nonfinite = backward_fp16_stats(model, cpu, x, y, 1.0)
    # measured: 2.9e-3 of the entries flushed to 0 (qBwd's dx worst), 40% subnormal
    assert lost > 1e-3, lost
    assert small > 0.2, small
    lost, small, biggest, nonfinite = backward_fp16_stats(model, cpu, x, y,
                                                          RECOMMENDED_LOSS_SCALE)
    # measured at 4096: no entry lost, 0.16% subnormal, largest |grad| 23 (fp16 max 65504)
    assert lost < 1e-5, lost
    assert small < 5e-3, small
    assert nonfinite == 0 and biggest < 65504 / 100


def test_loss_scale_sweep(tiny_sim):
    """Underflow falls as the scale grows, and the tiny model at init has room for scales
    far above the recommended one before anything overflows. Printed with pytest -s."""
    model, cpu, x, y = tiny_sim
    rows = []
    for scale in (1, 16, 256, 1024, 4096, 65536):
        rows.append((scale,) + backward_fp16_stats(model, cpu, x, y, float(scale)))
        print("loss scale {:6d}: lost {:.2e}  subnormal {:.2e}  max|grad| {:.3g}  "
              "non-finite {:d}".format(*rows[-1]))
    lost = [r[1] for r in rows]
    small = [r[2] for r in rows]
    assert all(a >= b for a, b in zip(small, small[1:]))
    assert lost[0] > 50 * max(lost[3:]) and small[0] > 100 * small[4]
    assert all(r[4] == 0 for r in rows) and rows[-1][3] < 65504 / 10


# -----------------------------------------------------------------------------------------
# training
# -----------------------------------------------------------------------------------------

def train_losses(backend, steps=20):
    t = Trainer(ModelConfig.preset("tiny"),
                TrainConfig(steps=steps, accum=1, warmup=2, lr=1e-3, backend=backend,
                            loss_scale=RECOMMENDED_LOSS_SCALE), log=lambda *a: None)
    assert t.backend == backend
    return np.array([t.step().loss for _ in range(steps)])


def test_twenty_sim_steps_lower_the_loss():
    sim = train_losses("sim")
    assert np.all(np.isfinite(sim))
    assert sim[-5:].mean() < sim[:5].mean() - 0.1, sim
    # and follow the cpu run closely (measured: within 1.1e-4 over 30 steps)
    cpu = train_losses("cpu")
    assert np.max(np.abs(sim - cpu)) < 1e-2, np.abs(sim - cpu)


def test_train_stories_cli_with_sim(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "ANECY_DATA"}
    ckpt = tmp_path / "sim.ckpt"
    proc = subprocess.run([sys.executable, str(ROOT / "train_stories.py"), "--preset", "tiny",
                           "--backend", "sim", "--steps", "20", "--no-progress",
                           "--ckpt", str(ckpt)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "backend sim" in proc.stdout and "step 20 loss" in proc.stdout, proc.stdout
    assert ckpt.exists()
