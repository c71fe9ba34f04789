"""The staging plans of the packed backends (anecy/_packed.pyx), against their oracle: the
numpy packing of anecy.kernel_layout (stage_weights, write_activations, unpack_output).

Every kernel of every shape below (the presets' layer shapes, GQA, QK-norm, odd sizes):
the plans' fp16 Surfaces must be bit-identical to that packing, and their fp32 outputs
bit-identical to its unpacking, on values that include fp16's edge cases (subnormals,
overflow to Inf, signed zeros, NaN payloads). Then the sdpaBwd1 -> sdpaBwd2 pass-through,
which must give exactly what the fp32 round trip gives."""
import numpy as np
import pytest

from anecy import Model, ModelConfig
from anecy._packed import LAYER_OUTPUT, METHODS, SHARED, WEIGHTED
from anecy._testing import kernel_io, pack_activations, run_kernel, unpack_outputs
from anecy.kernel_layout import (
    KERNEL_NAMES,
    layout,
    new_input_buffer,
    stage_weights,
    unpack_output,
    write_activations,
)

# kernel_layout's numpy packing (the oracle) warns about the values that overflow to Inf on purpose
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast")

SHAPES = {
    # one layer of each preset (the per-layer shapes are what the plans depend on)
    "stories110m": ModelConfig.preset("stories110m", n_layers=1, vocab_size=64),
    "qwen3-0.6b": ModelConfig.preset("qwen3-0.6b", n_layers=1, vocab_size=64, seq_len=64),
    "gqa": ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=24,
                       vocab_size=97, seq_len=32),
    "qwen3": ModelConfig(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=32, vocab_size=97, seq_len=32, qk_norm=True,
                         rope_style="half", rope_theta=1e6, norm_eps=1e-6),
    # odd sizes everywhere: rows and columns that fill no vector, tile or cache line
    "odd": ModelConfig(dim=37, hidden_dim=71, n_layers=2, n_heads=3, n_kv_heads=1, head_dim=14,
                       vocab_size=97, seq_len=19, qk_norm=True),
}

# Hugging Face name of each weight block's source, per layer
SOURCES = {"Wq": "self_attn.q_proj.weight", "Wk": "self_attn.k_proj.weight",
           "Wv": "self_attn.v_proj.weight", "Wo": "self_attn.o_proj.weight",
           "W1": "mlp.gate_proj.weight", "W2": "mlp.down_proj.weight",
           "W3": "mlp.up_proj.weight", "q_norm": "self_attn.q_norm.weight",
           "k_norm": "self_attn.k_norm.weight"}


def edgy(rng, shape):
    """fp32 values over fp16's whole range and its edge cases."""
    n = int(np.prod(shape))
    x = (rng.standard_normal(n) * 2.0 ** rng.integers(-26, 17, n)).astype(np.float32)
    special = np.array([0.0, -0.0, 65504, 65519.99, 65520, -70000, 2.0 ** -24, 2.0 ** -25,
                        -2.0 ** -25 * 1.0001, 6.1e-5, np.inf, -np.inf, np.nan], np.float32)
    idx = rng.choice(n, size=min(n, 4 * len(special)), replace=False)
    x[idx] = np.resize(special, len(idx))
    nan_bits = np.array([0x7f800001, 0xffa00000, 0x7fc12345], np.uint32).view(np.float32)
    x[rng.choice(n, size=min(n, 3), replace=False)] = nan_bits[:min(n, 3)]
    assert x.dtype == np.float32
    return x.reshape(shape)


def bits(a):
    return np.ascontiguousarray(a).view(np.uint16 if a.dtype == np.float16 else np.uint32)


@pytest.fixture(scope="module", params=sorted(SHAPES))
def model(request):
    cfg = SHAPES[request.param]
    m = Model(cfg, backend="sim", seed=0)
    rng = np.random.default_rng(1)
    for name, view in m.views.items():
        if ".layers." in name:
            view[...] = edgy(rng, view.shape)
    m.weights_changed()
    return request.param, cfg, m


def test_weight_staging_is_bit_identical_to_numpy(model):
    _, cfg, m = model
    k = m.engine.kernels
    for layer in range(cfg.n_layers):
        pre = f"model.layers.{layer}."
        for name in WEIGHTED:
            lay = layout(name, cfg)
            weights = {b.name: m.views[pre + SOURCES[b.name]] for b in lay.inputs
                       if b.kind == "weight"}
            got = k.input_buffer(name, layer).copy()
            want = new_input_buffer(name, cfg)
            want[...] = np.float16(7)        # staging must write every weight and pad cell
            stage_weights(name, cfg, want, **weights)
            for b in lay.inputs:
                if b.kind == "act":          # not the staging's business
                    want[b.row0:b.row0 + b.rows, b.col0:b.col0 + b.cols] = \
                        got[b.row0:b.row0 + b.rows, b.col0:b.col0 + b.cols]
            assert np.array_equal(bits(got), bits(want)), (name, layer)


@pytest.mark.parametrize("method", list(METHODS))
def test_activation_staging_is_bit_identical_to_numpy(model, method):
    _, cfg, m = model
    k = m.engine.kernels
    name = METHODS[method]
    ins, _ = kernel_io(k, method)
    rng = np.random.default_rng(len(method))
    for layer in (range(cfg.n_layers) if name in WEIGHTED else [0]):
        acts = {n: edgy(rng, (c, cfg.seq_len)) for n, c in ins}
        surface_layer = layer if name in WEIGHTED else -1
        want = k.input_buffer(name, surface_layer).copy()
        write_activations(name, cfg, want, **acts)
        pack_activations(k, method, layer, **acts)
        got = k.input_buffer(name, surface_layer)
        assert np.array_equal(bits(got), bits(want)), (name, layer)


@pytest.mark.parametrize("method", list(METHODS))
def test_output_unstaging_is_bit_identical_to_numpy(model, method):
    _, cfg, m = model
    k = m.engine.kernels
    name = METHODS[method]
    rng = np.random.default_rng(2)
    # sdpaFwd has an output Surface per layer: each one's plan reads its own
    for layer in (range(cfg.n_layers) if name in LAYER_OUTPUT else [0]):
        out = k.output_buffer(name, layer)
        # every fp16 bit pattern is fair game: NaN payloads, subnormals, Inf
        out.view(np.uint16)[...] = rng.integers(0, 1 << 16, out.shape, dtype=np.uint16)
        got = unpack_outputs(k, method, layer)
        want = unpack_output(name, cfg, out)
        assert sorted(got) == sorted(want) == sorted(n for n, _ in kernel_io(k, method)[1])
        for n in want:
            assert np.array_equal(bits(got[n]), bits(want[n])), (name, layer, n)


def test_kernel_io_follows_the_layout_table(model):
    _, cfg, m = model
    k = m.engine.kernels
    assert set(WEIGHTED) | set(SHARED) == set(KERNEL_NAMES)
    for method, name in METHODS.items():
        ins, outs = kernel_io(k, method)
        lay = layout(name, cfg)
        assert [n for n, _ in ins] == [b.name for b in lay.inputs if b.kind == "act"]
        for (n, c), b in zip(ins, (b for b in lay.inputs if b.kind == "act")):
            assert (c, cfg.seq_len) == b.array_shape
        assert outs == [(n, c) for n, _, c in lay.outputs]
        assert kernel_io(k, name) == (ins, outs)


# -----------------------------------------------------------------------------------------
# pass-through: sdpaBwd1's probs/dprobs straight into sdpaBwd2's input
# -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["gqa", "qwen3", "odd"])
def test_pass_through_equals_the_round_trip(shape):
    """Both fp16 pass-throughs (probs/dprobs in sdpaBwd1's output Surface, which is
    sdpaBwd2's input; q, k, v held in each layer's sdpaFwd output Surface and copied into
    sdpaBwd1/2's inputs, GQA-repeated) give bit for bit what the fp32 round trips give."""
    cfg = SHAPES[shape]
    x = np.arange(cfg.seq_len, dtype=np.int32) * 7 % cfg.vocab_size
    y = (x + 1) % cfg.vocab_size
    runs = {}
    for through in (True, False):
        m = Model(cfg, backend="sim", seed=4)
        k = m.engine.kernels
        k.passthrough = through
        loss = m.forward_backward(x, y, 4096.0)
        runs[through] = (loss, m.grads.copy(), k.passed_through, k.held_calls, k.holds_qkv)
    assert runs[True][2] == cfg.n_layers and runs[False][2] == 0
    assert runs[True][3] == 2 * cfg.n_layers and runs[False][3] == 0
    assert runs[True][4] == [True] * cfg.n_layers and runs[False][4] == [False] * cfg.n_layers
    assert runs[True][0] == runs[False][0]
    assert np.array_equal(runs[True][1], runs[False][1])
    assert np.all(np.isfinite(runs[True][1]))


@pytest.mark.parametrize("shape", ["gqa", "qwen3"])
def test_separate_surfaces_train_as_the_shared_one(shape, monkeypatch):
    """ANECY_SEPARATE_SURFACES=1 (a way around a device that would not let one Surface be
    sdpaBwd1's output and sdpaBwd2's input): a Surface each, probs through fp32, the same
    losses and gradients bit for bit; q, k, v are still held."""
    cfg = SHAPES[shape]
    x = np.arange(cfg.seq_len, dtype=np.int32) * 5 % cfg.vocab_size
    runs = {}
    for separate in ("", "1"):
        monkeypatch.setenv("ANECY_SEPARATE_SURFACES", separate)
        m = Model(cfg, backend="sim", seed=6)
        k = m.engine.kernels
        assert k.share_surfaces == (separate != "1")
        shared = k.output_surface("sdpaBwd1") is k.input_surface("sdpaBwd2")
        loss = m.forward_backward(x, x, 4096.0)
        runs[separate] = (loss, m.grads.copy(), shared, k.passed_through, k.held_calls)
    assert runs[""][2:4] == (True, cfg.n_layers) and runs["1"][2:4] == (False, 0)
    assert runs["1"][4] == runs[""][4] == 2 * cfg.n_layers
    assert runs[""][0] == runs["1"][0] and np.array_equal(runs[""][1], runs["1"][1])


def test_io_by_kernel_accounts_for_all_of_io():
    cfg = SHAPES["gqa"]
    m = Model(cfg, backend="sim", seed=1)
    k = m.engine.kernels
    assert all(v == (0.0, 0.0) for v in k.io_by_kernel.values())
    m.engine.reset_timers()
    x = np.arange(cfg.seq_len, dtype=np.int32) % cfg.vocab_size
    m.forward_backward(x, x, 4096.0)
    by = k.io_by_kernel
    assert sorted(by) == sorted(KERNEL_NAMES)
    assert all(pack > 0 and unpack > 0 for pack, unpack in by.values())
    assert sum(p + u for p, u in by.values()) == pytest.approx(k.io_ms, rel=1e-9)


def test_held_qkv_reach_the_backward_kernels_as_the_round_trip_would():
    """The inputs sdpaBwd1/2 run on (their input Surfaces) are the same halves whether q,
    k, v came from the hold or through fp32, GQA repeat included; a caller's own q (not
    the engine's) is converted as given."""
    cfg = SHAPES["gqa"]
    x = np.arange(cfg.seq_len, dtype=np.int32) * 3 % cfg.vocab_size
    surfaces = {}
    for through in (True, False):
        m = Model(cfg, backend="sim", seed=2)
        k = m.engine.kernels
        k.passthrough = through
        seen = []
        run = k.programs["sdpaBwd2"].run
        k.programs["sdpaBwd1"].run = lambda a, r=k.programs["sdpaBwd1"].run: (
            seen.append(("sdpaBwd1", np.array(a))), r(a))[1]
        k.programs["sdpaBwd2"].run = lambda a, r=run: (seen.append(("sdpaBwd2", np.array(a))),
                                                        r(a))[1]
        m.forward_backward(x, x, 4096.0)
        surfaces[through] = seen
    assert len(surfaces[True]) == 2 * cfg.n_layers
    for (name, a), (name2, b) in zip(surfaces[True], surfaces[False]):
        assert name == name2 and np.array_equal(a.view(np.uint16), b.view(np.uint16)), name
    # a caller's arrays: converted, not taken from the hold
    m = Model(cfg, backend="sim", seed=2)
    k = m.engine.kernels
    m.forward_backward(x, x, 4096.0)
    held = k.held_calls
    rng = np.random.default_rng(1)
    a = {n: rng.standard_normal((c, cfg.seq_len)).astype(np.float32)
         for n, c in kernel_io(k, "sdpa_bwd1")[0]}
    run_kernel(k, "sdpa_bwd1", 0, **a)
    want = np.vstack([a[n] for n in ("q", "k_rep", "v_rep", "da")]).astype(np.float16)
    assert np.array_equal(k.input_buffer("sdpaBwd1")[:want.shape[0]], want)
    assert k.held_calls == held


def test_callers_other_than_the_engine_get_fp32_probs():
    """run_kernel (a caller's own arrays) and tracing still see probs/dprobs in fp32."""
    cfg = SHAPES["gqa"]
    m = Model(cfg, backend="sim", seed=4)
    k = m.engine.kernels
    rng = np.random.default_rng(0)
    a = {n: rng.standard_normal((c, cfg.seq_len)).astype(np.float32)
         for n, c in kernel_io(k, "sdpa_bwd1")[0]}
    got = run_kernel(k, "sdpa_bwd1", 0, **a)
    fp16 = k.output_buffer("sdpaBwd1")
    want = unpack_output("sdpaBwd1", cfg, fp16)
    for n in ("probs", "dprobs"):
        assert np.array_equal(got[n], want[n]) and np.any(got[n] != 0)
    k.trace = []
    x = np.arange(cfg.seq_len, dtype=np.int32) % cfg.vocab_size
    m.forward_backward(x, x)
    trace, k.trace = k.trace, None
    assert k.passed_through == 0
    bwd2 = [ins for kernel, _, ins, _ in trace if kernel == "sdpaBwd2"]
    bwd1 = [outs for kernel, _, _, outs in trace if kernel == "sdpaBwd1"]
    assert len(bwd1) == len(bwd2) == cfg.n_layers
    for outs, ins in zip(bwd1, bwd2):
        assert np.array_equal(outs["probs"], ins["probs"]) and np.any(ins["probs"] != 0)


# -----------------------------------------------------------------------------------------
# the attention state: what the kernels keep, asked for as KEPT
# -----------------------------------------------------------------------------------------

QKV_OUT, QKV_IN = ("q_rope", "k_rope", "v"), ("q", "k_rep", "v_rep")


@pytest.mark.parametrize("backend", ["cpu", "sim"])
@pytest.mark.parametrize("shape", ["gqa", "qwen3", "odd"])
def test_kept_attention_state_equals_the_callers_arrays(backend, shape):
    """sdpa_fwd(l) keeps q, k, v and sdpa_bwd1(l) probs and dprobs for the kernels after
    them, as the engine asks (KEPT): the backward kernels then give what they give on the
    caller's own arrays of the same tensors (k and v repeated for GQA as HF does)."""
    cfg = SHAPES[shape]
    m = Model(cfg, backend=backend, seed=5)      # owns the weights k reads
    k = m.engine.kernels
    rng = np.random.default_rng(3)
    S, layer = cfg.seq_len, cfg.n_layers - 1
    xnorm = rng.standard_normal((cfg.dim, S)).astype(np.float32)
    da = rng.standard_normal((cfg.q_dim, S)).astype(np.float32)
    fwd = run_kernel(k, "sdpa_fwd", layer, xnorm=xnorm)
    kept_fwd = run_kernel(k, "sdpa_fwd", layer, kept=QKV_OUT, xnorm=xnorm)
    assert sorted(kept_fwd) == sorted(set(fwd) - set(QKV_OUT))
    assert all(np.array_equal(kept_fwd[n], fwd[n]) for n in kept_fwd)
    ratio = cfg.n_heads // cfg.n_kv_heads
    rep = lambda x: np.repeat(x.reshape(cfg.n_kv_heads, -1, S), ratio, 0).reshape(-1, S)  # noqa: E731
    given = dict(q=fwd["q_rope"], k_rep=rep(fwd["k_rope"]), v_rep=rep(fwd["v"]))
    bwd1 = run_kernel(k, "sdpa_bwd1", layer, da=da, **given)
    bwd2 = run_kernel(k, "sdpa_bwd2", layer, probs=bwd1["probs"], dprobs=bwd1["dprobs"],
                      q=given["q"], k_rep=given["k_rep"])
    kept1 = run_kernel(k, "sdpa_bwd1", layer, kept=QKV_IN + ("probs", "dprobs"), da=da)
    kept2 = run_kernel(k, "sdpa_bwd2", layer, kept=("probs", "dprobs", "q", "k_rep"))
    # cpu reuses the forward's probabilities where a caller's arrays recompute them
    same = np.array_equal if backend == "sim" else (
        lambda a, b: np.allclose(a, b, rtol=1e-5, atol=1e-6 * np.abs(b).max()))
    assert same(kept1["dv_rep"], bwd1["dv_rep"])
    for n in ("dq", "dk_rep"):
        assert same(kept2[n], bwd2[n]) and np.any(bwd2[n] != 0), n


def test_kept_state_that_was_never_kept_is_an_error():
    """On the packed backends, a backward kernel asking for state no kernel kept fails
    with the reason (a caller's own arrays at sdpa_fwd keep nothing)."""
    cfg = SHAPES["gqa"]
    m = Model(cfg, backend="sim", seed=5)
    k = m.engine.kernels
    S = cfg.seq_len
    run_kernel(k, "sdpa_fwd", 0, xnorm=np.ones((cfg.dim, S), np.float32))
    da = np.ones((cfg.q_dim, S), np.float32)
    with pytest.raises(RuntimeError, match="no sdpa_fwd of this layer kept its q, k, v"):
        run_kernel(k, "sdpa_bwd1", 0, kept=QKV_IN, da=da)
    given = {n: np.ones((cfg.q_dim, S), np.float32) for n in QKV_IN}
    run_kernel(k, "sdpa_bwd1", 0, da=da, **given)
    with pytest.raises(RuntimeError, match="no sdpa_bwd1 of this layer kept its probs"):
        run_kernel(k, "sdpa_bwd2", 0, kept=("probs", "dprobs"), q=given["q"],
                   k_rep=given["k_rep"])
