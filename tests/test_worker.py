"""The background dW worker (anecy/_worker.pyx), tested through the model: it is only
reachable from Cython. Jobs run in FIFO order, each exactly as it would run inline, so
gradients and losses must be bit-identical with the worker on (async_dw=True) or off;
the worker must keep going over many steps and shut down cleanly when its model goes.
"""
import gc
import os
import subprocess
import sys
import textwrap
import threading
import weakref

import numpy as np
import pytest

import anecy

BASE = dict(dim=48, hidden_dim=80, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=61,
            seq_len=19)
CONFIGS = {
    "gqa": BASE,
    "gqa-qknorm-half": dict(BASE, qk_norm=True, rope_style="half"),
    "mha-untied": dict(BASE, n_kv_heads=4, tie_embeddings=False),
}
CASES = pytest.mark.parametrize("case", sorted(CONFIGS))


def make(fields, async_dw, seed=0):
    return anecy.Model(anecy.ModelConfig(**fields), seed=seed, async_dw=async_dw)


def batch(cfg, seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
    targets = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
    return tokens, targets


def jobs_per_step(cfg):
    # the classifier's dW, then w2, w1, w3, wo, wq, wk, wv per layer
    return 1 + 7 * cfg.n_layers


def assert_same_grads(a, b):
    for name in a.grad_views:
        assert np.array_equal(a.grad_views[name], b.grad_views[name]), name
    assert np.array_equal(a.grads, b.grads)


@CASES
def test_async_and_inline_gradients_are_bit_identical(case):
    on, off = make(CONFIGS[case], True), make(CONFIGS[case], False)
    assert on.engine.async_dw and not off.engine.async_dw
    assert np.array_equal(on.params, off.params)
    cfg = on.config
    tokens, targets = batch(cfg, 1)
    first = None
    for step in range(1, 4):  # gradients accumulate over the three calls
        loss_on = on.forward_backward(tokens, targets)
        loss_off = off.forward_backward(tokens, targets)
        assert loss_on == loss_off and np.isfinite(loss_on)
        assert_same_grads(on, off)
        jobs = step * jobs_per_step(cfg)  # every queued dW job ran; inline queues none
        assert on.engine.worker.jobs_done == jobs and off.engine.worker.jobs_done == 0
        if first is None:
            first = on.grads.copy()
            # every parameter got a gradient (norm weights and the embedding included)
            for name, g in on.grad_views.items():
                assert np.any(g != 0.0), name
        else:
            # same inputs each time: the buffers hold `step` times the first gradient
            # (up to float32 rounding of the accumulation)
            np.testing.assert_allclose(on.grads, step * first, rtol=1e-5,
                                       atol=1e-6 * np.abs(first).max())
    # the params are untouched by a step
    assert np.array_equal(on.params, off.params)


@CASES
def test_bit_identical_with_varying_batches_and_loss_scale(case):
    on, off = make(CONFIGS[case], True, seed=7), make(CONFIGS[case], False, seed=7)
    cfg = on.config
    for step, scale in enumerate([1.0, 0.5, 1024.0, 3.0]):
        tokens, targets = batch(cfg, 100 + step)
        assert on.forward_backward(tokens, targets, scale) == \
            off.forward_backward(tokens, targets, scale)
        assert_same_grads(on, off)


def test_zero_grad_zeroes_and_the_next_step_starts_fresh():
    on, off = make(BASE, True), make(BASE, False)
    cfg = on.config
    tokens, targets = batch(cfg, 3)
    single = make(BASE, True)
    single.forward_backward(tokens, targets)
    for m in (on, off):
        for i in range(3):
            m.forward_backward(*batch(cfg, 10 + i))
        assert np.any(m.grads != 0.0)
        grads_buffer = m.grads
        m.zero_grad()
        assert m.grads is grads_buffer  # zeroed in place: the engine's pointers still see it
        assert not np.any(m.grads)
        for g in m.grad_views.values():
            assert not np.any(g)
        # after zero_grad one step gives exactly a fresh model's single-step gradient
        m.forward_backward(tokens, targets)
        assert np.array_equal(m.grads, single.grads)


def test_worker_survives_many_steps():
    fields = dict(BASE, dim=16, hidden_dim=24, n_heads=2, n_kv_heads=1, seq_len=7)
    on, off = make(fields, True), make(fields, False)
    cfg = on.config
    rng = np.random.default_rng(5)
    n_steps = 50
    for step in range(n_steps):
        tokens = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
        targets = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
        if step % 10 == 9:
            on.zero_grad()
            off.zero_grad()
        assert on.forward_backward(tokens, targets) == off.forward_backward(tokens, targets)
    assert_same_grads(on, off)
    assert on.engine.worker.jobs_done == n_steps * jobs_per_step(cfg)
    assert on.engine.steps == n_steps


def test_worker_keeps_working_after_a_rejected_call():
    on, off = make(BASE, True), make(BASE, False)
    cfg = on.config
    tokens, targets = batch(cfg, 4)
    bad = targets.copy()
    bad[3] = cfg.vocab_size
    for m in (on, off):
        with pytest.raises(ValueError):
            m.forward_backward(tokens, bad)
        with pytest.raises(ValueError):
            m.forward_backward(tokens[:-1], targets[:-1])
        assert m.engine.worker.jobs_done == 0
        assert not np.any(m.grads)
        m.forward_backward(tokens, targets)
    assert_same_grads(on, off)


def test_models_are_freed_without_hanging_in_process():
    refs = []
    for i in range(6):
        m = make(BASE, async_dw=i % 2 == 0, seed=i)
        if i % 3:
            m.forward_backward(*batch(m.config, i))
        refs.append(weakref.ref(m))
        del m  # no reference cycle: freed (and its worker joined) right here
        assert refs[-1]() is None
    # a model caught in a reference cycle goes with the cyclic garbage collector
    m = make(BASE, True)
    m.forward_backward(*batch(m.config, 0))
    m.me = m
    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_model_deleted_from_another_thread():
    m = make(BASE, True)
    m.forward_backward(*batch(m.config, 0))
    box = [m]
    ref = weakref.ref(m)
    del m
    t = threading.Thread(target=box.clear)
    t.start()
    t.join(60)
    assert not t.is_alive(), "deleting a model from another thread hung"
    assert ref() is None


# Run in a child process with a timeout so that a hang fails the test instead of
# stalling the suite. On Linux it also counts the process's OS threads: one per live
# async model, none left once they are gone.
CHILD = textwrap.dedent("""
    import gc, os, sys
    import numpy as np
    import anecy

    fields = dict(dim=48, hidden_dim=80, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=61,
                  seq_len=19)
    cfg = anecy.ModelConfig(**fields)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 61, 19).astype(np.int32)
    targets = rng.integers(0, 61, 19).astype(np.int32)

    def n_threads():
        task = "/proc/self/task"
        return len(os.listdir(task)) if os.path.isdir(task) else None

    warm = anecy.Model(cfg, async_dw=False)     # BLAS thread pools start here, if any
    warm.forward_backward(tokens, targets)
    base = n_threads()

    for round in range(8):
        models = [anecy.Model(anecy.ModelConfig(**fields), seed=i, async_dw=True)
                  for i in range(4)]
        if base is not None:
            assert n_threads() == base + 4, (round, n_threads(), base)
        for i, m in enumerate(models):
            if (i + round) % 2:
                m.forward_backward(tokens, targets)
        if round % 2:
            models[0].me = models[0]             # one of them only goes with gc
        del models, m
        gc.collect()
        if base is not None:
            assert n_threads() == base, (round, n_threads(), base)

    inline = [anecy.Model(cfg, async_dw=False) for _ in range(3)]
    if base is not None:                          # the worker also serves the optimizer
        assert n_threads() == base + 3
    del inline
    gc.collect()
    if base is not None:
        assert n_threads() == base
    # and a live async model at interpreter exit must not hang the shutdown
    last = anecy.Model(cfg, async_dw=True)
    last.forward_backward(tokens, targets)
    print("ok", base)
""")


def test_create_and_delete_many_models_does_not_hang_or_leak_threads():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok"), proc.stdout + proc.stderr


@pytest.mark.parametrize("n, n_decay", [(1, 0), (1, 1), (7, 5), (1001, 1000), (4096, 17)])
def test_two_thread_optimizer_passes_equal_the_single_pass(n, n_decay):
    from anecy._testing import py_adamw, py_sumsq
    engine = make(BASE, False).engine
    rng = np.random.default_rng(n)
    p, g, m, v = (rng.standard_normal(n).astype(np.float32) for _ in range(4))
    v = np.abs(v)
    ref = [a.copy() for a in (p, g, m, v)]
    args = (1e-3, 0.9, 0.95, 1e-8)
    engine.adamw(p, g, m, v, n_decay, *args, 0.1, 3, 0.5)
    py_adamw(ref[0][:n_decay], ref[1][:n_decay], ref[2][:n_decay], ref[3][:n_decay], *args,
             0.1, 3, 0.5)
    py_adamw(ref[0][n_decay:], ref[1][n_decay:], ref[2][n_decay:], ref[3][n_decay:], *args,
             0.0, 3, 0.5)
    for got, want in zip((p, m, v), (ref[0], ref[2], ref[3])):
        assert np.array_equal(got, want)
    assert not g.any()  # cleared on the way
    x = rng.standard_normal(n).astype(np.float32)
    assert engine.grad_sumsq(x) == pytest.approx(py_sumsq(x), rel=1e-12)
    with pytest.raises(ValueError):
        engine.adamw(p, g[:-1] if n > 1 else g[:0], m, v, n_decay, *args, 0.1, 3, 1.0)
