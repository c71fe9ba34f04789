"""Each generated kernel program run through the simulator against a plain numpy (float64)
statement of its semantics (kernel_cases.py), and the constants the programs carry."""

import numpy as np
import pytest

from anecy import mil
from anecy.blob import read_blob
from anecy.config import ModelConfig
from anecy.kernel_layout import (
    KERNEL_NAMES,
    MASK_VALUE,
    layout,
    output_shape,
    pack_input,
    unpack_output,
)
from anecy.milsim import run
from fp16_bounds import TOLERANCE, U, max_rel_err
from kernel_cases import CONFIGS, QWEN3_TINY, inputs, make_cfg, reference

# ------------------------------------------------------------------------------------------
# kernels against the reference
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_name", sorted(CONFIGS))
@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_kernel_matches_reference(kernel, cfg_name):
    cfg = make_cfg(cfg_name)
    a = inputs(kernel, cfg)
    prog = mil.generate(kernel, cfg)
    out = run(prog, pack_input(kernel, cfg, **a))
    assert out.dtype == np.float16 and out.shape == output_shape(kernel, cfg)
    got = unpack_output(kernel, cfg, out)
    want = reference(kernel, cfg, a)
    assert sorted(got) == sorted(want)
    for name, ref in want.items():
        assert got[name].shape == ref.shape, name
        err = max_rel_err(got[name], ref)
        assert err <= TOLERANCE[kernel], (kernel, cfg_name, name, err / U)


def test_causal_probs_are_exactly_zero_above_the_diagonal():
    cfg = make_cfg("gqa")
    a = inputs("sdpaBwd1", cfg)
    got = unpack_output("sdpaBwd1", cfg, run(mil.generate("sdpaBwd1", cfg),
                                                    pack_input("sdpaBwd1", cfg, **a)))
    S = cfg.seq_len
    p = got["probs"].reshape(cfg.n_heads, S, S)
    assert np.all(p[:, np.triu_indices(S, 1)[0], np.triu_indices(S, 1)[1]] == 0)
    assert np.allclose(p.sum(axis=2), 1, atol=8 * U)


def test_gqa_uses_hf_head_mapping():
    """Query heads 0..r-1 read kv head 0: give kv head 0 and 1 different values and
    check each query head's output against the kv head HF's repeat_kv assigns it."""
    cfg = make_cfg("gqa")
    a = inputs("sdpaFwd", cfg)
    hd, r = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    a["Wv"][:] = 0
    for g in range(cfg.n_kv_heads):      # v of kv head g is constant g + 1
        a["Wv"][g * hd:(g + 1) * hd, 0] = g + 1
    a["xnorm"][0, :] = 1
    got = unpack_output("sdpaFwd", cfg, run(mil.generate("sdpaFwd", cfg),
                                                   pack_input("sdpaFwd", cfg, **a)))
    for h in range(cfg.n_heads):
        assert np.allclose(got["attn"][h * hd:(h + 1) * hd], h // r + 1, atol=4 * U)


def test_qk_norm_weights_fold_when_head_dim_exceeds_dim():
    cfg = ModelConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2, head_dim=48, vocab_size=8,
                      seq_len=8, qk_norm=True, rope_style="half")
    blk = layout("sdpaFwd", cfg).block("q_norm")
    assert (blk.rows, blk.cols) == (16, 3)        # smallest divisor k of 48 with 48/k <= 16
    a = inputs("sdpaFwd", cfg)
    got = unpack_output("sdpaFwd", cfg, run(mil.generate("sdpaFwd", cfg),
                                                   pack_input("sdpaFwd", cfg, **a)))
    want = reference("sdpaFwd", cfg, a)
    for name in want:
        assert max_rel_err(got[name], want[name]) <= TOLERANCE["sdpaFwd"], name


def test_mask_blob_in_program():
    cfg = make_cfg("mha")
    prog = mil.gen_sdpaBwd1(cfg)
    mask = read_blob(prog.blobs["@model_path/weights/mask.bin"]).reshape(32, 32)
    assert np.all(mask[np.tril_indices(32)] == 0)
    assert np.all(mask[np.triu_indices(32, 1)] == MASK_VALUE)


def test_qk_norm_eps_must_survive_fp16():
    cfg = ModelConfig(**dict(QWEN3_TINY, norm_eps=1e-9))
    with pytest.raises(ValueError):
        mil.gen_sdpaFwd(cfg)
    # 1e-6 is an fp16 subnormal: kept, not flushed
    text = mil.gen_sdpaFwd(make_cfg("qwen3")).text
    assert "val=fp16(0.000001)" in text
