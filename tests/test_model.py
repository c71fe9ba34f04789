"""Model math against HF transformers + PyTorch autograd (tiny random models, offline)."""
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from anecy import ConfigError, Model, ModelConfig

CASES = {
    # name: (anecy config fields, HF family)
    "mha-tied-half": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=4,
                          vocab_size=97, seq_len=23, rope_style="half"),
    "mha-untied-interleaved": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=4,
                                   vocab_size=97, seq_len=23, tie_embeddings=False),
    "gqa-interleaved": dict(dim=48, hidden_dim=80, n_layers=3, n_heads=6, n_kv_heads=2,
                            vocab_size=61, seq_len=17),
    "gqa-headdim-untied-half": dict(dim=40, hidden_dim=72, n_layers=2, n_heads=4, n_kv_heads=2,
                                    head_dim=24, vocab_size=53, seq_len=30, rope_style="half",
                                    tie_embeddings=False, rope_theta=500.0),
    "qwen3-gqa4": dict(dim=64, hidden_dim=128, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16,
                       vocab_size=101, seq_len=21, rope_style="half", qk_norm=True,
                       norm_eps=1e-6, rope_theta=1e6),
    "qwen3-interleaved": dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=4,
                              head_dim=24, vocab_size=67, seq_len=19, qk_norm=True,
                              norm_eps=1e-6, rope_theta=1e6),
}


def hf_model(cfg: ModelConfig):
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
                  intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                  head_dim=cfg.head_dim, max_position_embeddings=cfg.seq_len,
                  rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                  tie_word_embeddings=cfg.tie_embeddings, attention_bias=False)
    if cfg.qk_norm:
        model = Qwen3ForCausalLM(Qwen3Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(mlp_bias=False, **common))
    model = model.float().eval()
    torch.manual_seed(cfg.n_layers * 1000 + cfg.vocab_size)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # HF starts norms at 1; move them so their gradients matter
                p.add_(torch.randn_like(p) * 0.2)
    return model


def run_case(fields, async_dw=True):
    cfg = ModelConfig(**fields)
    hf = hf_model(cfg)
    ours = Model(cfg, async_dw=async_dw)
    ours.load_hf_state_dict(hf.state_dict())
    rng = np.random.default_rng(cfg.seq_len)
    tokens = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
    targets = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
    logits = hf(torch.tensor(tokens[None].astype(np.int64))).logits[0]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets.astype(np.int64)))
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in hf.named_parameters()}
    return cfg, ours, tokens, targets, logits.detach().numpy(), loss.item(), grads


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_hf(case):
    cfg, ours, tokens, targets, ref_logits, ref_loss, ref_grads = run_case(CASES[case])
    logits = ours.logits(tokens)
    assert logits.shape == (cfg.seq_len, cfg.vocab_size)
    assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()

    ours.zero_grad()
    loss = ours.forward_backward(tokens, targets)
    assert abs(loss - ref_loss) <= 1e-6 * max(1.0, abs(ref_loss))
    grads = ours.hf_grads()
    for name, ref in ref_grads.items():
        err = np.linalg.norm(grads[name] - ref) / np.linalg.norm(ref)
        assert err <= 1e-4, f"{name}: relative error {err:.2e}"
    # every anecy parameter has an HF counterpart (lm_head of tied models is the embedding)
    assert set(grads) == set(ref_grads) - ({"lm_head.weight"} if cfg.tie_embeddings else set())


def test_gradients_accumulate_until_zero_grad():
    cfg = ModelConfig(**CASES["gqa-interleaved"])
    m = Model(cfg)
    tok = np.arange(cfg.seq_len, dtype=np.int32) % cfg.vocab_size
    m.forward_backward(tok, tok)
    once = m.grads.copy()
    m.forward_backward(tok, tok)
    np.testing.assert_allclose(m.grads, 2 * once, rtol=1e-5, atol=1e-9)
    m.zero_grad()
    assert not m.grads.any()


def test_async_worker_bit_identical():
    for case in ("gqa-interleaved", "qwen3-gqa4"):
        cfg = ModelConfig(**CASES[case])
        rng = np.random.default_rng(5)
        tok = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
        tgt = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
        results = []
        for async_dw in (True, False):
            m = Model(cfg, seed=3, async_dw=async_dw)
            losses = [m.forward_backward(tok, tgt) for _ in range(2)]
            results.append((losses, m.grads.copy()))
        assert results[0][0] == results[1][0]
        assert np.array_equal(results[0][1], results[1][1])


def test_hf_state_dict_round_trip_and_rope_permutation():
    fields = CASES["mha-untied-interleaved"]
    cfg_i = ModelConfig(**fields)
    cfg_h = ModelConfig(**dict(fields, rope_style="half"))
    hf = hf_model(cfg_i)
    inter, half = Model(cfg_i), Model(cfg_h)
    inter.load_hf_state_dict(hf.state_dict())
    half.load_hf_state_dict(hf.state_dict())
    sd = inter.hf_state_dict()
    for name, value in hf.state_dict().items():
        np.testing.assert_array_equal(sd[name], value.numpy())
    q = "model.layers.0.self_attn.q_proj.weight"
    # interleaved storage differs from HF's row order, yet both compute the same logits
    assert not np.array_equal(inter.views[q], half.views[q])
    tok = np.arange(cfg_i.seq_len, dtype=np.int32)
    np.testing.assert_allclose(inter.logits(tok), half.logits(tok), rtol=0, atol=1e-5)


def test_load_rejects_wrong_tensors():
    cfg = ModelConfig(**CASES["mha-tied-half"])
    m = Model(cfg)
    sd = m.hf_state_dict()
    bad = dict(sd)
    del bad["model.norm.weight"]
    with pytest.raises(ConfigError, match="lacks"):
        m.load_hf_state_dict(bad)
    bad = dict(sd, **{"model.layers.0.mlp.up_proj.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ConfigError, match="up_proj.*shape"):
        m.load_hf_state_dict(bad)
    with pytest.raises(ConfigError, match="unexpected"):
        m.load_hf_state_dict(dict(sd, extra=np.zeros(1)))


def test_bad_token_ids_raise():
    cfg = ModelConfig(**CASES["mha-tied-half"])
    m = Model(cfg)
    tok = np.zeros(cfg.seq_len, np.int32)
    with pytest.raises(ValueError, match="outside"):
        m.forward_backward(tok, np.full(cfg.seq_len, cfg.vocab_size, np.int32))
    with pytest.raises(ValueError, match="outside"):
        m.logits(np.full(cfg.seq_len, -1, np.int32))
    with pytest.raises(ValueError, match="seq_len"):
        m.logits(tok[:-1])


def test_init_follows_llama2c():
    cfg = ModelConfig.preset("stories15m")
    m = Model(cfg, seed=0)
    assert m.params.dtype == np.float32 and m.params.size == cfg.n_params
    assert abs(m.views["model.embed_tokens.weight"].std() - 0.02) < 1e-3
    out_std = 0.02 / np.sqrt(2 * cfg.n_layers)
    assert abs(m.views["model.layers.0.mlp.down_proj.weight"].std() - out_std) < 1e-3 * out_std * 10
    o_proj = m.views["model.layers.0.self_attn.o_proj.weight"]
    assert abs(o_proj.std() - out_std) < 1e-3 * out_std * 10
    assert abs(m.views["model.layers.0.mlp.up_proj.weight"].std() - 0.02) < 1e-3
    assert np.all(m.views["model.norm.weight"] == 1.0)
    # the decayed range holds the matrices, the rest are norm weights
    assert np.all(m.params[m.n_decay:] == 1.0)
    assert m.n_decay == m.params.size - (2 * cfg.n_layers + 1) * cfg.dim
    # views share the flat buffer
    m.views["model.norm.weight"][0] = 7.0
    assert m.params[-cfg.dim] == 7.0
    same = Model(cfg, seed=0)
    other = Model(cfg, seed=1)
    assert np.array_equal(Model(cfg, seed=0).params, same.params)
    assert not np.array_equal(other.params, same.params)


def test_cached_attention_probabilities_serve_only_the_kept_state():
    # the cpu backend keeps each layer's probabilities from the forward (its attention
    # state, asked for by the engine); a kernel called on a caller's own arrays must
    # compute its own, and leave the kept state as it was
    from anecy._testing import py_attention_bwd, run_kernel
    cfg = ModelConfig(**CASES["mha-tied-half"])
    m = Model(cfg)
    tok = np.arange(cfg.seq_len, dtype=np.int32) % cfg.vocab_size
    rng = np.random.default_rng(0)
    first = m.forward_backward(tok, tok)
    for _ in range(20):  # temporaries are freed and their memory reused in between
        assert m.forward_backward(tok, tok) == first
        # a forward on temporary arrays, whose q output is freed at once
        run_kernel(m.engine.kernels, "sdpa_fwd", 0,
                   xnorm=rng.standard_normal((cfg.dim, cfg.seq_len)).astype(np.float32))
        a = {n: rng.standard_normal((cfg.q_dim, cfg.seq_len)).astype(np.float32)
             for n in ("q", "k_rep", "v_rep", "da")}
        got = run_kernel(m.engine.kernels, "sdpa_bwd1", 0, **a)
        _, _, dv, probs, dprobs = py_attention_bwd(a["q"], a["k_rep"], a["v_rep"], a["da"],
                                                   cfg.n_heads)
        np.testing.assert_array_equal(got["probs"], probs)
        np.testing.assert_array_equal(got["dv_rep"], dv)


@pytest.mark.parametrize("backend", ["cpu", "sim"])
@pytest.mark.parametrize("damage", ["shape", "nan", "inf", "text"])
def test_a_refused_load_leaves_the_model_as_it_was(backend, damage):
    cfg = ModelConfig(**CASES["qwen3-gqa4"])
    m = Model(cfg, backend=backend, seed=1)
    m.set_active_vocab(np.arange(0, cfg.vocab_size, 2))  # a compact copy of classifier rows
    tokens = np.arange(cfg.seq_len) % cfg.vocab_size
    params, logits = m.params.copy(), m.logits(tokens)
    state = Model(cfg, seed=2).hf_state_dict()
    last = "model.norm.weight"  # loaded last: every other tensor would be copied before it
    if damage == "shape":
        state[last] = state[last][:-1]
    elif damage == "text":
        state[last] = np.array(["x"] * cfg.dim)
    else:
        state[last][3] = np.nan if damage == "nan" else np.inf
    with pytest.raises(ConfigError, match=last):
        m.load_hf_state_dict(state)
    assert np.array_equal(m.params, params)
    np.testing.assert_array_equal(m.logits(tokens), logits)  # staged copies untouched too
