"""LoRA adapters against PEFT: PEFT-made adapters load into anecy with PeftModel's logits,
anecy's PEFT directories load into PeftModel with anecy's logits, initialisation as PEFT's,
the RoPE row order of q/k adapters, LoRA checkpoints, and bad input through the CLI."""
import json
import math

import numpy as np
import pytest
import torch
from test_model import CASES, hf_model

from anecy import Model, ModelConfig
from anecy.checkpoint import read_checkpoint_meta, save_checkpoint
from anecy.cli import anecy_main
from anecy.errors import CheckpointError, ConfigError
from anecy.hf import read_safetensors, save_pretrained, write_safetensors
from anecy.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LORA_ARRAYS,
    LORA_CHECKPOINT,
    TARGETS,
    LoraAdapters,
    LoraConfig,
    base_hash,
    fuse,
    fuse_state_dict,
    load_lora_checkpoint,
    lora_layout,
    read_lora_checkpoint_meta,
    read_peft,
    save_lora_checkpoint,
    save_peft,
)
from conftest import require_module, require_shared

peft = require_module("peft", 'pip install -e ".[test]"', "PEFT is the oracle of LoRA")

# model shape, LoRA settings (rank, alpha, targets, last N layers)
LLAMA_HD = dict(CASES["gqa-headdim-untied-half"], n_layers=3)   # head_dim != dim / n_heads
SETTINGS = {
    "llama-gqa-headdim-all": (LLAMA_HD, 8, 16, TARGETS, None),
    "llama-interleaved-qkv-last2": (CASES["gqa-interleaved"], 3, 5, ("q_proj", "k_proj",
                                                                       "v_proj"), 2),
    "qwen3-rank1-subset-last1": (CASES["qwen3-gqa4"], 1, 2, ("q_proj", "o_proj", "down_proj"),
                                 1),
    "qwen3-interleaved-odd-rank": (CASES["qwen3-interleaved"], 5, 7.5, TARGETS, None),
}


def tokens_of(cfg, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)


def torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens[None].astype(np.int64))).logits[0].numpy()


def assert_close(ours, theirs, rel=1e-5):
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err <= rel, f"relative error {err:.2e}"


def peft_model(cfg, rank, alpha, targets, layers, seed=1):
    """(base state dict, PeftModel) of a tiny random HF model with PEFT LoRA adapters whose
    A and B are both random (B nonzero, so the adapters change the logits)."""
    hf = hf_model(cfg)
    base = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    layer_ids = None if layers is None else list(range(cfg.n_layers - layers, cfg.n_layers))
    pc = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                         layers_to_transform=layer_ids, lora_dropout=0.0,
                         task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, pc).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return base, pm


def anecy_base(cfg, base_sd):
    model = Model(ModelConfig(**cfg) if isinstance(cfg, dict) else cfg)
    model.load_hf_state_dict(base_sd)
    return model


# -- PEFT's adapters in anecy, anecy's in PEFT ---------------------------------------------------
@pytest.mark.parametrize("case", sorted(SETTINGS))
def test_a_peft_adapter_gives_peftmodels_logits(tmp_path, case):
    fields, rank, alpha, targets, layers = SETTINGS[case]
    cfg = ModelConfig(**fields)
    base_sd, pm = peft_model(cfg, rank, alpha, targets, layers)
    pm.save_pretrained(tmp_path)
    adapters = read_peft(tmp_path, cfg)
    assert (adapters.config.rank, adapters.config.alpha, adapters.config.layers) == \
        (rank, alpha, layers)
    assert set(adapters.config.targets) == set(targets)
    tokens = tokens_of(cfg)
    fused = fuse(anecy_base(cfg, base_sd), adapters)
    theirs = torch_logits(pm, tokens)
    assert_close(fused.logits(tokens), theirs)
    # and the adapters do change the model: the base alone is far from PEFT's logits
    assert np.abs(anecy_base(cfg, base_sd).logits(tokens) - theirs).max() > 1e-3
    # fused into an HF state dict (HF's row order) gives PEFT's merged weights
    merged = {k: v.numpy() for k, v in pm.merge_and_unload().state_dict().items()}
    ours = fuse_state_dict({k: v.numpy() for k, v in base_sd.items()}, adapters)
    for name, value in merged.items():
        np.testing.assert_allclose(ours[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_all_linear_and_bf16_adapters_from_peft(tmp_path):
    cfg = ModelConfig(**CASES["qwen3-gqa4"])
    hf = hf_model(cfg)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    pm.to(torch.bfloat16).save_pretrained(tmp_path)
    adapters = read_peft(tmp_path, cfg)
    assert adapters.config.targets == TARGETS      # every linear layer but the output head
    theirs = {k.replace(".default", ""): v.float().detach().numpy()
              for k, v in pm.named_parameters() if "lora_" in k}
    for name, value in adapters.peft_state_dict().items():
        np.testing.assert_array_equal(value, theirs[name])   # bf16 widened exactly


def random_adapters(cfg, lora_cfg, seed=3):
    adapters = LoraAdapters(cfg, lora_cfg, seed=seed)
    rng = np.random.default_rng(seed)
    for t in adapters.layout:
        if t.part == "B":
            adapters.views[t.name][...] = rng.standard_normal(t.shape) * 0.2
    return adapters


@pytest.mark.parametrize("case", sorted(SETTINGS))
def test_anecys_peft_export_gives_anecys_logits_in_peftmodel(tmp_path, case):
    fields, rank, alpha, targets, layers = SETTINGS[case]
    cfg = ModelConfig(**fields)
    hf = hf_model(cfg)
    base = anecy_base(cfg, hf.state_dict())
    adapters = random_adapters(cfg, LoraConfig(rank=rank, alpha=alpha, targets=targets,
                                               layers=layers))
    save_peft(tmp_path / "ours", adapters, "a/base")
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "ours").eval()
    tokens = tokens_of(cfg, 1)
    assert_close(fuse(base, adapters).logits(tokens), torch_logits(pm, tokens))

    # the files are PEFT's own: the same config fields and values, the same tensors
    pm.save_pretrained(tmp_path / "theirs")
    ours = json.loads((tmp_path / "ours" / ADAPTER_CONFIG).read_text())
    theirs = json.loads((tmp_path / "theirs" / ADAPTER_CONFIG).read_text())
    assert ours["base_model_name_or_path"] == "a/base"
    assert sorted(ours) == sorted(theirs)
    for key in set(ours) - {"base_model_name_or_path", "target_modules"}:
        assert ours[key] == theirs[key], key
    assert sorted(ours["target_modules"]) == sorted(theirs["target_modules"])
    from safetensors.numpy import load_file
    a, b = load_file(tmp_path / "ours" / ADAPTER_WEIGHTS), \
        load_file(tmp_path / "theirs" / ADAPTER_WEIGHTS)
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == \
        {k: (v.shape, v.dtype) for k, v in b.items()}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_peft_names_and_shapes_in_the_layout():
    cfg = ModelConfig(**LLAMA_HD)
    layout = lora_layout(cfg, LoraConfig(rank=4, targets=("k_proj", "down_proj"), layers=2))
    names = [t.name for t in layout]
    assert names[:2] == ["base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight",
                         "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"]
    assert names[-1] == "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight"
    shapes = {t.name.split("model.layers.")[1]: t.shape for t in layout}
    assert shapes["1.self_attn.k_proj.lora_A.weight"] == (4, cfg.dim)
    assert shapes["1.self_attn.k_proj.lora_B.weight"] == (4 * 0 + cfg.kv_dim, 4)
    assert shapes["2.mlp.down_proj.lora_A.weight"] == (4, cfg.hidden_dim)
    # one flat buffer, tensors back to back in layout order
    assert [t.offset for t in layout] == list(np.cumsum([0] + [t.size for t in layout[:-1]]))


# -- initialisation --------------------------------------------------------------------------
def test_init_is_pefts_and_step_0_is_the_base():
    cfg = ModelConfig(**dict(CASES["qwen3-gqa4"], dim=256, hidden_dim=512))
    hf = hf_model(cfg)
    base_sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS),
                                                 task_type="CAUSAL_LM"))
    theirs = {k.replace(".default", ""): v.detach().numpy()
              for k, v in pm.named_parameters() if "lora_" in k}
    adapters = LoraAdapters(cfg, LoraConfig(), seed=0)
    assert {t.name: t.shape for t in adapters.layout} == \
        {k: v.shape for k, v in theirs.items()}
    for t in adapters.layout:
        ours, ref = adapters.views[t.name], theirs[t.name]
        if t.part == "B":
            assert not ours.any() and not ref.any()
            continue
        bound = 1 / math.sqrt(t.shape[1])   # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), ..)
        assert np.abs(ref).max() <= bound and np.abs(ours).max() <= bound
    # the same distribution: pooled over every A, quantiles of x / bound agree with PEFT's
    pool = [np.concatenate([(v / (1 / math.sqrt(v.shape[1]))).ravel()
                            for k, v in src.items() if "lora_A" in k])
            for src in (dict(adapters.views), theirs)]
    qs = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(np.quantile(pool[0], qs), np.quantile(pool[1], qs), atol=0.03)
    np.testing.assert_allclose(np.quantile(pool[0], qs), 2 * qs - 1, atol=0.03)
    # B is zero, so the adapted model starts as the base, exactly
    tokens = tokens_of(cfg)
    base = anecy_base(cfg, base_sd)
    assert np.array_equal(fuse(base, adapters).logits(tokens), base.logits(tokens))
    assert_close(base.logits(tokens), torch_logits(pm, tokens))
    # seeded: the same seed the same adapters, another seed others
    assert np.array_equal(LoraAdapters(cfg, LoraConfig(), seed=0).params, adapters.params)
    assert not np.array_equal(LoraAdapters(cfg, LoraConfig(), seed=1).params, adapters.params)


# -- RoPE row order --------------------------------------------------------------------------
def test_q_and_k_adapters_are_kept_in_the_models_row_order(tmp_path):
    """An interleaved-RoPE model keeps q/k rows permuted from HF's order; so do the rows of
    q/k's B matrices in the flat buffer, and the PEFT files hold HF's order."""
    fields = CASES["gqa-interleaved"]
    half = ModelConfig(**dict(fields, rope_style="half"))
    inter = ModelConfig(**fields)
    lc = LoraConfig(rank=2, targets=("q_proj", "k_proj", "v_proj"))
    base_sd, pm = peft_model(half, 2, 4, lc.targets, None)
    pm.save_pretrained(tmp_path)
    a_half, a_inter = read_peft(tmp_path, half), read_peft(tmp_path, inter)
    q = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    v = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    hd = inter.head_dim
    # within each head, interleaved row 2i is HF row i and row 2i+1 is HF row i + hd/2
    np.testing.assert_array_equal(a_inter.views[q][0::2][:hd // 2], a_half.views[q][:hd // 2])
    np.testing.assert_array_equal(a_inter.views[q][1::2][:hd // 2],
                                  a_half.views[q][hd // 2:hd])
    np.testing.assert_array_equal(a_inter.views[v], a_half.views[v])    # v is not permuted
    assert not np.array_equal(a_inter.views[q], a_half.views[q])
    # fused in the Model's order, the fused weights are the same model in HF's order
    f_half = fuse(anecy_base(half, base_sd), a_half).hf_state_dict()
    f_inter = fuse(anecy_base(inter, base_sd), a_inter).hf_state_dict()
    for name in f_half:
        np.testing.assert_array_equal(f_half[name], f_inter[name])
    # and written back, HF's order again: the same tensors PEFT wrote
    save_peft(tmp_path / "again", a_inter)
    ours, theirs = (read_safetensors(d / ADAPTER_WEIGHTS) for d in (tmp_path / "again", tmp_path))
    for name in theirs:
        np.testing.assert_array_equal(ours[name], theirs[name])


# -- the base's identity -----------------------------------------------------------------------
def test_base_hash_names_the_weights():
    cfg = ModelConfig(**CASES["gqa-interleaved"])
    a, b = Model(cfg, seed=1), Model(cfg, seed=1)
    assert base_hash(a) == base_hash(b) and base_hash(a).startswith("sha256:")
    b.params[7] = np.nextafter(b.params[7], np.float32(1))
    assert base_hash(a) != base_hash(b)


# -- LoRA checkpoints --------------------------------------------------------------------------
STATE = {"step": 40, "updates": 4, "pending": 0, "loss_scale": 4096.0, "clean_updates": 3,
         "sampler": {"rng": {"bit_generator": "PCG64", "state": 12345}, "pos": 17}}


def lora_checkpoint(tmp_path, cfg=None, base=None, lora_cfg=None, **kw):
    cfg = cfg or ModelConfig(**CASES["qwen3-gqa4"])
    base = base or Model(cfg, seed=2)
    adapters = random_adapters(cfg, lora_cfg or LoraConfig(rank=3, targets=("q_proj", "v_proj",
                                                                            "down_proj")))
    rng = np.random.default_rng(0)
    m = rng.standard_normal(adapters.params.size).astype(np.float32)
    v = rng.random(adapters.params.size).astype(np.float32)
    path = tmp_path / "lora.ckpt"
    save_lora_checkpoint(path, adapters, {"path": str(kw.pop("base_path", "base")),
                                          "hash": base_hash(base)}, m, v, STATE, fsync=False,
                         **kw)
    return path, base, adapters, m, v


def test_lora_checkpoint_round_trip_and_no_base_weights(tmp_path):
    path, base, adapters, m, v = lora_checkpoint(tmp_path)
    meta, loaded, arrays = load_lora_checkpoint(path, base_hash=base_hash(base))
    assert np.array_equal(loaded.params, adapters.params)
    assert np.array_equal(arrays["adam_m"], m) and np.array_equal(arrays["adam_v"], v)
    assert loaded.config == adapters.config and loaded.model_config == adapters.model_config
    assert meta["kind"] == LORA_CHECKPOINT and meta["base"]["hash"] == base_hash(base)
    for key, value in STATE.items():
        assert meta[key] == value
    # the adapters, their moments and the file's framing only: never the base's weights
    head = read_checkpoint_meta(path)
    assert set(head["arrays"]) == {"adapters", "adam_m", "adam_v"}
    assert path.stat().st_size < 3 * adapters.params.nbytes + 8192
    assert path.stat().st_size < base.params.nbytes / 4


def test_lora_checkpoint_keeps_mid_accumulation_grads_and_refuses_bad_arrays(tmp_path):
    cfg = ModelConfig(**CASES["qwen3-gqa4"])
    g = np.arange(LoraAdapters(cfg, LoraConfig(rank=3, targets=("q_proj", "v_proj",
                                                                "down_proj"))).params.size,
                  dtype=np.float32)
    path, *_ = lora_checkpoint(tmp_path, cfg, grads=g, active_ids=[1, 5, 9])
    _, _, arrays = load_lora_checkpoint(path)
    assert np.array_equal(arrays["grads"], g) and list(arrays["active_ids"]) == [1, 5, 9]
    adapters = LoraAdapters(cfg, LoraConfig())
    with pytest.raises(ConfigError, match="adam_m"):
        save_lora_checkpoint(tmp_path / "x", adapters, {"path": "b", "hash": "h"},
                             np.zeros(3, np.float32), adapters.params.copy(), STATE)
    with pytest.raises(ConfigError, match="loss_scale"):
        save_lora_checkpoint(tmp_path / "x", adapters, {"path": "b", "hash": "h"},
                             adapters.params.copy(), adapters.params.copy(), {"step": 1})
    assert not (tmp_path / "x").exists()


def test_lora_checkpoint_of_another_base_or_holding_weights_is_refused(tmp_path):
    path, base, *_ = lora_checkpoint(tmp_path)
    other = Model(base.config, seed=3)
    with pytest.raises(CheckpointError, match="another base"):
        load_lora_checkpoint(path, base_hash=base_hash(other))
    # a file that says it is a LoRA checkpoint but holds base weights is not one
    meta = read_checkpoint_meta(path)["meta"]
    save_checkpoint(tmp_path / "fat.ckpt", meta, {"adapters": np.zeros(3, np.float32),
                                                  "params": base.params}, fsync=False)
    with pytest.raises(CheckpointError, match="never"):
        read_lora_checkpoint_meta(tmp_path / "fat.ckpt")


@pytest.fixture
def hf_base(tmp_path):
    """An HF directory of a tiny random Llama (head_dim != dim / heads), and its HF model."""
    cfg = ModelConfig(**dict(LLAMA_HD, rope_style="half"))
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "base")
    return cfg, tmp_path / "base", hf


def cli(args, capsys):
    capsys.readouterr()   # what came before (transformers' progress bars) is not the command's
    try:
        code = anecy_main([str(a) for a in args])
    except SystemExit as e:   # argparse's own errors (one line, status 2)
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_export_of_a_lora_checkpoint_fused_and_as_peft(tmp_path, capsys, hf_base):
    cfg, base_dir, hf = hf_base
    from anecy.hf import load_pretrained
    base = load_pretrained(base_dir, seq_len=cfg.seq_len)
    lc = LoraConfig(rank=4, alpha=4, targets=("q_proj", "k_proj", "gate_proj"), layers=2)
    path, _, adapters, _, _ = lora_checkpoint(tmp_path, cfg, base, lc, base_path=base_dir)
    fused = fuse(base, adapters)
    tokens = tokens_of(cfg, 2)
    code, out, err = cli(["export", "--ckpt", path, "--format", "peft", "--out",
                          tmp_path / "peft"], capsys)
    assert code == 0, err
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    assert_close(fused.logits(tokens), torch_logits(pm, tokens))
    code, out, err = cli(["export", "--ckpt", path, "--format", "hf", "--out", tmp_path / "hf"],
                         capsys)
    assert code == 0, err
    from transformers import AutoModelForCausalLM
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    assert_close(torch_logits(merged, tokens), torch_logits(pm, tokens))
    # adapters and a LoRA checkpoint together, or peft without adapters: one line
    save_peft(tmp_path / "a", adapters)
    for args, words in ((["--ckpt", path, "--adapter", tmp_path / "a"], "holds adapters"),
                        (["--init-from", base_dir], "writes LoRA adapters")):
        code, _, err = cli(["export", *args, "--format", "peft", "--out", tmp_path / "p2"],
                           capsys)
        one_line_error(code, err)
        assert words in err and not (tmp_path / "p2").exists()
    # a base that changed since is refused, and nothing is written
    changed = load_pretrained(base_dir, seq_len=cfg.seq_len)
    changed.params[:10] += 1
    save_pretrained(changed, base_dir)
    code, out, err = cli(["export", "--ckpt", path, "--format", "hf", "--out",
                          tmp_path / "hf2"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "changed" in err, err
    assert not (tmp_path / "hf2").exists()


def test_fused_exports_of_a_base_and_adapter(tmp_path, capsys):
    """--adapter on export: a PEFT adapter on an HF base, fused into an HF directory and into
    a llama2.c file of the interleaved order, each PeftModel's logits; and written again."""
    fields, rank, alpha, targets, layers = SETTINGS["llama-interleaved-qkv-last2"]
    cfg = ModelConfig(**dict(fields, rope_style="half", tie_embeddings=True))
    base_sd, pm = peft_model(cfg, rank, alpha, targets, layers)
    pm.save_pretrained(tmp_path / "adapter")
    save_pretrained(anecy_base(cfg, base_sd), tmp_path / "base")
    tokens = tokens_of(cfg, 4)
    theirs = torch_logits(pm, tokens)
    common = ["--init-from", tmp_path / "base", "--adapter", tmp_path / "adapter"]
    assert cli(["export", *common, "--format", "hf", "--out", tmp_path / "hf"], capsys)[0] == 0
    assert cli(["export", *common, "--format", "llama2c", "--out", tmp_path / "m.bin"],
               capsys)[0] == 0
    assert cli(["export", *common, "--format", "peft", "--out", tmp_path / "again"],
               capsys)[0] == 0
    from anecy import llama2c
    from anecy.hf import load_pretrained
    for model in (load_pretrained(tmp_path / "hf", seq_len=cfg.seq_len),
                  llama2c.load(tmp_path / "m.bin", seq_len=cfg.seq_len)):
        assert_close(model.logits(tokens), theirs)
    assert llama2c.load(tmp_path / "m.bin").config.rope_style == "interleaved"
    again = peft.PeftModel.from_pretrained(hf_model(cfg), tmp_path / "again").eval()
    again.load_state_dict(pm.state_dict())    # the same base weights as pm's
    assert_close(torch_logits(again, tokens), theirs)
    # the base as a llama2.c file (interleaved rows) and the PEFT adapter (HF's rows): the
    # adapter's q/k rows are permuted as the base's, and the fused model is PeftModel's
    assert cli(["export", "--init-from", tmp_path / "base", "--format", "llama2c", "--out",
                tmp_path / "base.bin"], capsys)[0] == 0
    code, out, err = cli(["export", "--init-from", tmp_path / "base.bin", "--adapter",
                          tmp_path / "adapter", "--format", "hf", "--out", tmp_path / "hf3"],
                         capsys)
    assert code == 0, err
    assert_close(load_pretrained(tmp_path / "hf3", seq_len=cfg.seq_len).logits(tokens), theirs)


def test_sample_with_an_adapter_samples_the_fused_model(tmp_path, capsys, hf_base):
    spm = require_shared("data", "llama2-tokenizer", "tokenizer.model", why="decodes samples")
    cfg, base_dir, hf = hf_base
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS),
                                                 task_type="CAUSAL_LM"))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    pm.save_pretrained(tmp_path / "adapter")
    pm.merge_and_unload().save_pretrained(tmp_path / "merged")
    args = ["--tokenizer", spm, "--temperature", 0, "--max-new-tokens", 12]
    code, with_adapter, err = cli(["sample", "--init-from", base_dir, "--adapter",
                                   tmp_path / "adapter", *args], capsys)
    assert code == 0, err
    code, merged, err = cli(["sample", "--init-from", tmp_path / "merged", *args], capsys)
    assert code == 0, err
    code, plain, err = cli(["sample", "--init-from", base_dir, *args], capsys)
    assert with_adapter == merged and with_adapter != plain
    # a LoRA checkpoint of the same adapters samples the same text from the base it names
    from anecy.hf import load_pretrained
    base = load_pretrained(base_dir, seq_len=cfg.seq_len)
    adapters = read_peft(tmp_path / "adapter", cfg)
    rng = np.random.default_rng(0)
    moments = [rng.random(adapters.params.size, dtype=np.float32) for _ in range(2)]
    save_lora_checkpoint(tmp_path / "lora.ckpt", adapters,
                         {"path": str(base_dir), "hash": base_hash(base)}, *moments, STATE)
    code, from_ckpt, err = cli(["sample", "--ckpt", tmp_path / "lora.ckpt", *args], capsys)
    assert code == 0, err
    assert from_ckpt == with_adapter


def test_init_from_a_lora_checkpoint_loads_its_fused_model_or_nothing(tmp_path, hf_base):
    from anecy.hf import load_pretrained
    from anecy.pretrained import load_into
    cfg, base_dir, _ = hf_base
    base = load_pretrained(base_dir, seq_len=cfg.seq_len)
    path, _, adapters, _, _ = lora_checkpoint(tmp_path, cfg, base, LoraConfig(rank=2),
                                              base_path=base_dir)
    model = Model(cfg, seed=9)
    load_into(model, path)
    assert np.array_equal(model.params, fuse(base, adapters).params)
    # a base changed since: refused, and the model is left as it was
    changed = load_pretrained(base_dir, seq_len=cfg.seq_len)
    changed.params[-5:] *= 2
    save_pretrained(changed, base_dir)
    before = Model(cfg, seed=9)
    model = Model(cfg, seed=9)
    with pytest.raises(CheckpointError, match="changed"):
        load_into(model, path)
    assert np.array_equal(model.params, before.params)


# -- bad input, through the CLI ----------------------------------------------------------------
def one_line_error(code, err):
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err


def edit_config(src, dst, **changes):
    import shutil
    shutil.copytree(src, dst)
    doc = json.loads((dst / ADAPTER_CONFIG).read_text())
    doc.update(changes)
    (dst / ADAPTER_CONFIG).write_text(json.dumps(doc))
    return dst


@pytest.fixture
def bad_adapters(tmp_path, hf_base):
    """[(words of the error, adapter directory refused for hf_base's model)]."""
    cfg, base_dir, hf = hf_base
    good = tmp_path / "good"
    save_peft(good, random_adapters(cfg, LoraConfig(rank=4)), str(base_dir))
    out = []
    # another PEFT method: a LoHa adapter made by PEFT
    loha = peft.get_peft_model(hf_model(cfg), peft.LoHaConfig(r=4, target_modules=["q_proj"]))
    loha.save_pretrained(tmp_path / "loha")
    out.append(("LOHA", tmp_path / "loha"))
    # an adapter made by PEFT for another shape (hidden size)
    other = ModelConfig(**dict(LLAMA_HD, rope_style="half", dim=48))
    pm = peft.get_peft_model(hf_model(other), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                              task_type="CAUSAL_LM"))
    pm.save_pretrained(tmp_path / "other")
    out.append(("shape", tmp_path / "other"))
    out.append(("c_attn", edit_config(good, tmp_path / "target", target_modules=["c_attn"])))
    # r 8 in the config, tensors of rank 4
    out.append(("has rank 4", edit_config(good, tmp_path / "rank", r=8)))
    out.append(("positive integer, got 0", edit_config(good, tmp_path / "rank0", r=0)))
    out.append(("larger", edit_config(good, tmp_path / "big", r=1000)))
    out.append(("use_dora", edit_config(good, tmp_path / "dora", use_dora=True)))
    # PEFT can adapt any set of modules; anecy the same targets in each of the last N layers
    out.append(("last N layers", edit_config(good, tmp_path / "first", layers_to_transform=[0])))
    out.append(("last N layers", edit_config(good, tmp_path / "mixed", target_modules=[
        "v_proj", "model.layers.2.self_attn.q_proj"])))
    cut = edit_config(good, tmp_path / "cut")
    tensors = read_safetensors(cut / ADAPTER_WEIGHTS)
    tensors.pop(sorted(tensors)[3])
    write_safetensors(cut / ADAPTER_WEIGHTS, tensors)
    out.append(("lacks 1 LoRA tensor", cut))
    out.append(("not a PEFT", tmp_path / "nothing"))
    (tmp_path / "nothing").mkdir()
    return base_dir, out


def test_bad_adapters_are_one_line_and_nothing_is_written(tmp_path, capsys, bad_adapters):
    base_dir, bad = bad_adapters
    for words, adapter in bad:
        for fmt in ("peft", "hf"):
            out = tmp_path / f"out-{fmt}"
            code, _, err = cli(["export", "--init-from", base_dir, "--adapter", adapter,
                                "--format", fmt, "--out", out], capsys)
            one_line_error(code, err)
            assert words in err, (words, err)
            assert not out.exists()
        code, _, err = cli(["sample", "--init-from", base_dir, "--adapter", adapter,
                            "--max-new-tokens", 1], capsys)
        one_line_error(code, err)
        assert words in err, (words, err)
        code, _, err = cli(["train", "--lora", "--init-from", base_dir, "--init-adapter",
                            adapter, "--ckpt", tmp_path / "t.ckpt"], capsys)
        one_line_error(code, err)
        assert words in err, (words, err)
        assert not (tmp_path / "t.ckpt").exists()


@pytest.mark.parametrize("flags, words", [
    (["--lora"], "--init-from"),
    (["--lora", "--scratch"], "--scratch"),
    (["--lora-rank", "4", "--init-from", "{base}"], "needs --lora"),
    (["--init-adapter", "{base}", "--init-from", "{base}"], "needs --lora"),
    (["--lora", "--init-from", "{base}", "--lora-rank", "0"], "positive"),
    (["--lora", "--init-from", "{base}", "--lora-rank", "1000"], "larger than"),
    (["--lora", "--init-from", "{base}", "--lora-targets", "q_proj,c_attn"], "c_attn"),
    (["--lora", "--init-from", "{base}", "--lora-targets", "q_proj,q_proj"], "twice"),
    (["--lora", "--init-from", "{base}", "--lora-layers", "9"], "more than"),
    (["--lora", "--init-from", "{base}", "--lora-dropout", "1"], "dropout"),
    (["--lora", "--init-from", "{base}", "--lora-alpha", "-1"], "alpha"),
    (["--lora", "--init-from", "{base}", "--init-adapter", "{good}", "--lora-rank", "2"],
     "leave out --lora-rank"),
    (["--lora", "--resume", "--init-adapter", "{good}"], "--init-adapter"),
    (["--lora", "--init-from", "{base}", "--lora-dropout", "-0.1"], "dropout"),
    # the merged weights of sim and ane cannot drop the adapters' input, and it says so
    (["--lora", "--init-from", "{base}", "--lora-dropout", "0.1", "--backend", "sim"],
     "needs --backend cpu"),
])
def test_bad_lora_flags_are_one_line(tmp_path, capsys, hf_base, flags, words):
    cfg, base_dir, _ = hf_base
    save_peft(tmp_path / "good", random_adapters(cfg, LoraConfig(rank=2)))
    flags = [f.format(base=base_dir, good=tmp_path / "good") for f in flags]
    ckpt = tmp_path / "run.ckpt"
    code, _, err = cli(["train", *flags, "--ckpt", ckpt, "--steps", 1], capsys)
    one_line_error(code, err)
    assert words in err, err
    assert not ckpt.exists()


def test_resuming_lora_checkpoints(tmp_path, capsys, hf_base):
    cfg, base_dir, _ = hf_base
    from anecy.hf import load_pretrained
    base = load_pretrained(base_dir, seq_len=cfg.seq_len)
    path, *_ = lora_checkpoint(tmp_path, cfg, base, LoraConfig(rank=2), base_path=base_dir)
    for flags, words in ((["--lora", "--resume", "--lora-rank", "4"], "leave out --lora-rank"),):
        code, _, err = cli(["train", *flags, "--ckpt", path, "--steps", 1], capsys)
        one_line_error(code, err)
        assert words in err, err
    # --lora on a full-training checkpoint
    save_checkpoint(tmp_path / "full.ckpt", {"kind": "anecy-train"}, {}, fsync=False)
    code, _, err = cli(["train", "--lora", "--resume", "--ckpt", tmp_path / "full.ckpt"], capsys)
    one_line_error(code, err)
    assert "not a LoRA checkpoint" in err
    assert set(LORA_ARRAYS) >= set(read_checkpoint_meta(path)["arrays"])
