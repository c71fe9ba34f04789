"""Configuration: presets, validation of ModelConfig and TrainConfig, parameter and FLOP
counts (the FLOPs against PyTorch's own count of an HF training step)."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from anecy import ConfigError, ModelConfig
from anecy.config import PRESETS, TrainConfig, layer_flops, step_flops
from anecy.hf import config_to_hf


def hf_model(cfg: ModelConfig):
    """An HF model of cfg's shape (anecy.hf's config mapping), eager attention."""
    hf_config = config_to_hf(cfg)
    config = AutoConfig.for_model(hf_config.pop("model_type"), **hf_config)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


# ------------------------------------------------------------------------------------------
# presets
# ------------------------------------------------------------------------------------------

def test_presets():
    s = ModelConfig.preset("stories110m")
    assert (s.dim, s.hidden_dim, s.n_layers, s.n_heads, s.n_kv_heads, s.head_dim) == \
        (768, 2048, 12, 12, 12, 64)
    assert (s.vocab_size, s.seq_len, s.norm_eps, s.rope_theta, s.rope_style) == \
        (32000, 256, 1e-5, 10000.0, "interleaved")
    assert s.tie_embeddings and not s.qk_norm and s.residual_scale == 1.0
    # 32000 x 768 embedding + 12 layers x (4 x 768^2 + 3 x 768 x 2048 + 2 x 768) + 768
    assert s.n_params == 109_529_856
    s15 = ModelConfig.preset("stories15m")
    assert (s15.dim, s15.hidden_dim, s15.n_layers, s15.n_heads) == (288, 768, 6, 6)
    q = ModelConfig.preset("qwen3-0.6b")
    assert (q.dim, q.hidden_dim, q.n_layers, q.n_heads, q.n_kv_heads, q.head_dim) == \
        (1024, 3072, 28, 16, 8, 128)
    assert (q.vocab_size, q.seq_len, q.norm_eps, q.rope_theta, q.rope_style) == \
        (151936, 256, 1e-6, 1e6, "half")
    assert q.qk_norm and q.tie_embeddings
    assert abs(q.n_params - 596e6) < 1e6       # Qwen3-0.6B: 0.6B with tied embeddings
    tiny = ModelConfig.preset("tiny")
    assert tiny.vocab_size == 32000 and tiny.rope_style == s.rope_style
    t = ModelConfig.preset("qwen3-tiny")
    assert t.qk_norm and t.n_kv_heads < t.n_heads and t.head_dim != t.dim // t.n_heads
    assert ModelConfig.preset("tiny", seq_len=32).seq_len == 32   # overrides
    with pytest.raises(ConfigError, match="unknown preset"):
        ModelConfig.preset("gpt5")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_round_trips_through_a_dict(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_fields_are_refused():
    d = ModelConfig.preset("tiny").to_dict()
    d["n_experts"] = 8
    with pytest.raises(ConfigError, match="n_experts"):
        ModelConfig.from_dict(d)


# ------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, word", [
    (dict(n_heads=5), "n_heads"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(head_dim=15), "head_dim"),
    (dict(dim=0), "dim"),
    (dict(hidden_dim=-4), "hidden_dim"),
    (dict(seq_len=0), "seq_len"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(n_layers=True), "n_layers"),
    (dict(rope_style="spiral"), "rope_style"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_theta=math.inf), "rope_theta"),
    (dict(residual_scale=float("nan")), "residual_scale"),
])
def test_invalid_model_configs_name_the_field(fields, word):
    base = dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, vocab_size=97, seq_len=16)
    base.update(fields)
    with pytest.raises(ConfigError, match=word):
        ModelConfig(**base)


@pytest.mark.parametrize("field, value", [("steps", 0), ("accum", 0), ("lr", -1.0),
                                          ("lr", math.inf), ("clip", -0.5), ("betas", (1.0, 0.9)),
                                          ("warmup", -1), ("backend", "gpu"),
                                          ("min_lr_frac", 1.5), ("loss_scale", 0.0),
                                          ("eval_batches", 0), ("ckpt_every", 2.5)])
def test_invalid_train_configs_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**{field: value})


def test_train_config_round_trips_through_a_dict():
    tc = TrainConfig(steps=7, betas=[0.8, 0.9], loss_scale=64.0)
    assert tc.betas == (0.8, 0.9)
    assert TrainConfig.from_dict(tc.to_dict()) == tc


# ------------------------------------------------------------------------------------------
# parameter and FLOP counts, against an HF model of the same shape
# ------------------------------------------------------------------------------------------

COUNT_CASES = {
    "llama-gqa-untied": ModelConfig(dim=48, hidden_dim=80, n_layers=2, n_heads=4, n_kv_heads=2,
                                    vocab_size=97, seq_len=24, tie_embeddings=False),
    "qwen3-tiny": ModelConfig.preset("qwen3-tiny", vocab_size=101, seq_len=20),
}


@pytest.mark.parametrize("case", sorted(COUNT_CASES))
def test_n_params_counts_the_hf_model(case):
    cfg = COUNT_CASES[case]
    assert cfg.n_params == sum(p.numel() for p in hf_model(cfg).parameters())


@pytest.mark.parametrize("case", sorted(COUNT_CASES))
def test_step_flops_count_an_hf_training_step(case):
    # PyTorch counts the matmul FLOPs of one forward and backward of the HF model (eager
    # attention: full S x S score and value products, as step_flops counts them)
    cfg = COUNT_CASES[case]
    torch.manual_seed(0)
    model = hf_model(cfg)
    ids = (torch.arange(cfg.seq_len) % cfg.vocab_size)[None]
    counter = FlopCounterMode(display=False)
    with counter:
        model(input_ids=ids, labels=ids).loss.backward()
    assert step_flops(cfg) == counter.get_total_flops()


def test_step_flops_parts():
    cfg = COUNT_CASES["qwen3-tiny"]
    S, D, V = cfg.seq_len, cfg.dim, cfg.vocab_size
    classifier = 2 * S * D * V
    assert step_flops(cfg) == 3 * (cfg.n_layers * layer_flops(cfg) + classifier)
    # a compacted classifier counts its active rows only
    assert step_flops(cfg) - step_flops(cfg, active_vocab=10) == 3 * 2 * S * D * (V - 10)
    assert layer_flops(cfg, seq_len=2 * S) > 2 * layer_flops(cfg)   # attention is quadratic
