"""Training LoRA adapters: the engine's adapter gradients against PEFT + PyTorch autograd,
a frozen base, LoRA runs of the trainer (checkpoints, resume) and the command line."""

import numpy as np
import pytest
import torch
from test_lora import SETTINGS, peft_model, tokens_of
from test_model import CASES, hf_model

from anecy import CheckpointError, ConfigError, Model, ModelConfig
from anecy.checkpoint import read_checkpoint_meta
from anecy.lora import (
    LORA_ARRAYS,
    LoraAdapters,
    LoraConfig,
    base_hash,
    fuse,
    load_lora_checkpoint,
    read_peft,
)
from anecy.pretrained import load_into
from anecy.trainer import TrainConfig, Trainer
from conftest import require_module

peft = require_module("peft", 'pip install -e ".[test]"', "PEFT is the oracle of LoRA")

# more shapes than test_lora's: the Llama GQA case with two targets of the FFN only
GRAD_SETTINGS = dict(SETTINGS, **{
    "llama-ffn-rank3-last1": (CASES["gqa-headdim-untied-half"], 3, 4, ("gate_proj", "down_proj"),
                              1),
})


def rel_err(ours, theirs):
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-30))


def torch_lora_grads(pm, tokens, targets):
    """(loss, {PEFT name: gradient}) of PEFT's model on one sequence, by autograd."""
    pm.zero_grad()
    logits = pm(torch.tensor(tokens[None].astype(np.int64))).logits[0]
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor(targets.astype(np.int64)))
    loss.backward()
    return loss.item(), {n.replace(".default", ""): p.grad.numpy().copy()
                         for n, p in pm.named_parameters() if "lora_" in n}


def hf_order(adapters, flat):
    """A flat buffer laid out as ``adapters.params`` as {PEFT name: array in HF's row order}."""
    twin = LoraAdapters(adapters.model_config, adapters.config)
    twin.params[...] = flat
    return twin.peft_state_dict()


@pytest.mark.parametrize("async_dw", [True, False])
@pytest.mark.parametrize("case", sorted(GRAD_SETTINGS))
def test_adapter_gradients_equal_pefts(tmp_path, case, async_dw):
    fields, rank, alpha, targets, layers = GRAD_SETTINGS[case]
    cfg = ModelConfig(**fields)
    base_sd, pm = peft_model(cfg, rank, alpha, targets, layers)
    pm.save_pretrained(tmp_path)
    adapters = read_peft(tmp_path, cfg)
    model = Model(cfg, async_dw=async_dw, adapters=adapters)
    model.load_hf_state_dict(base_sd)
    tokens, targets_ = tokens_of(cfg, 1), tokens_of(cfg, 2)
    loss = model.forward_backward(tokens, targets_)
    assert model.grads is None
    pm.train()
    their_loss, theirs = torch_lora_grads(pm, tokens, targets_)
    assert abs(loss - their_loss) <= 1e-5 * abs(their_loss)
    ours = hf_order(adapters, model.adapter_grads)
    assert set(ours) == set(theirs)
    for name, g in theirs.items():
        assert np.abs(g).max() > 0, name
        assert rel_err(ours[name], g) <= 1e-5, (name, rel_err(ours[name], g))
    # gradients accumulate over microsteps, as the base's do in full training
    model.forward_backward(tokens, targets_)
    ours2 = hf_order(adapters, model.adapter_grads)
    for name, g in theirs.items():
        assert rel_err(ours2[name], 2 * g) <= 1e-5, name


# -- dropout on the adapters' input ----------------------------------------------------------
FIELDS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w1",
          "up_proj": "w3", "down_proj": "w2"}


class GivenMask(torch.nn.Module):
    """PEFT's lora_dropout with a given keep mask [S, in]: x * mask / (1 - p)."""

    def __init__(self, mask, p):
        super().__init__()
        self.mask, self.p = torch.tensor(mask, dtype=torch.float32), p

    def forward(self, x):
        return x * self.mask * (1.0 / (1.0 - self.p))


@pytest.mark.parametrize("case", ["llama-gqa-headdim-all", "qwen3-interleaved-odd-rank",
                                  "qwen3-rank1-subset-last1"])
def test_adapter_gradients_with_dropout_equal_pefts_with_the_same_masks(tmp_path, case):
    fields, rank, alpha, targets, layers = GRAD_SETTINGS[case]
    cfg = ModelConfig(**fields)
    p = 0.3
    base_sd, pm = peft_model(cfg, rank, alpha, targets, layers)
    pm.save_pretrained(tmp_path)
    adapters = read_peft(tmp_path, cfg)
    model = Model(cfg, adapters=adapters)
    model.load_hf_state_dict(base_sd)
    tokens, targets_ = tokens_of(cfg, 1), tokens_of(cfg, 2)
    no_drop = model.loss(tokens, targets_)
    model.set_lora_dropout(p, key=11)
    loss = model.forward_backward(tokens, targets_)
    assert model.loss(tokens, targets_) == no_drop      # evaluation never drops
    # PEFT's dropout modules replaced by the masks anecy drew, one per adapted projection
    n_masks, kept = 0, []
    for name, module in pm.named_modules():
        if hasattr(module, "lora_dropout") and "default" in module.lora_dropout:
            layer = int(name.split("layers.")[1].split(".")[0])
            mask = model.engine.lora_dropout_mask(layer, FIELDS[name.split(".")[-1]])
            module.lora_dropout["default"] = GivenMask(mask.T, p)
            n_masks += 1
            kept.append(mask.mean())
    assert n_masks == len(adapters.pairs)
    assert abs(np.mean(kept) - (1 - p)) < 0.05          # about 1 - p of the inputs kept
    pm.train()
    their_loss, theirs = torch_lora_grads(pm, tokens, targets_)
    assert abs(loss - their_loss) <= 1e-5 * abs(their_loss)
    ours = hf_order(adapters, model.adapter_grads)
    for name, g in theirs.items():
        assert np.abs(g).max() > 0, name
        assert rel_err(ours[name], g) <= 1e-5, (name, rel_err(ours[name], g))
    # another key draws other masks
    before = {f: model.engine.lora_dropout_mask(cfg.n_layers - 1, f) for f in ("wq",)}
    model.set_lora_dropout(p, key=12)
    assert not np.array_equal(before["wq"], model.engine.lora_dropout_mask(cfg.n_layers - 1,
                                                                          "wq"))


def test_dropout_zero_is_bit_identical_to_none_and_above_zero_is_not():
    fields, rank, alpha, targets, layers = GRAD_SETTINGS["llama-gqa-headdim-all"]
    cfg = ModelConfig(**fields)
    tokens, targets_ = tokens_of(cfg, 1), tokens_of(cfg, 2)
    grads = []
    for p in (None, 0.0, 0.1):
        adapters = LoraAdapters(cfg, LoraConfig(rank=rank, alpha=alpha), seed=4)
        for t in adapters.layout:       # B nonzero, so every gradient flows
            if t.part == "B":
                adapters.views[t.name][...] = np.random.default_rng(4).standard_normal(
                    t.shape) * 0.1
        model = Model(cfg, seed=2, adapters=adapters)
        if p is not None:
            model.set_lora_dropout(p, key=3)
        model.forward_backward(tokens, targets_)
        grads.append(model.adapter_grads.copy())
    np.testing.assert_array_equal(grads[0], grads[1])
    assert rel_err(grads[2], grads[0]) > 1e-3


def test_dropout_is_refused_where_weights_are_merged_and_outside_0_1():
    cfg = ModelConfig(**BASE)
    model = Model(cfg, "sim", adapters=LoraAdapters(cfg, LoraConfig(rank=2)))
    with pytest.raises(ConfigError, match="cpu backend"):
        model.set_lora_dropout(0.1, key=1)
    model.set_lora_dropout(0.0)              # none is fine everywhere
    cpu = Model(cfg, adapters=LoraAdapters(cfg, LoraConfig(rank=2)))
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ConfigError, match="dropout"):
            cpu.set_lora_dropout(bad)
    with pytest.raises(ConfigError, match="adapters"):
        Model(cfg).set_lora_dropout(0.1)
    with pytest.raises(ConfigError, match="cpu backend"):
        lora_trainer_config = TrainConfig(steps=1, backend="sim", init_from="x")
        Trainer._adapters(cfg, lora_trainer_config, LoraConfig(rank=2, dropout=0.1), None, None)


# -- LoRA runs of the trainer ---------------------------------------------------------------
BASE = dict(CASES["gqa-headdim-untied-half"], n_layers=3)


def small_tokens(vocab, n=3000, seed=0):
    # a repeating pattern with noise: learnable
    rng = np.random.default_rng(seed)
    base = np.arange(n) % vocab
    return np.where(rng.random(n) < 0.2, rng.integers(0, vocab, n), base).astype(np.uint16)


def quiet(*_):
    pass


@pytest.fixture
def base_dir(tmp_path):
    """An HF directory of a tiny random Llama (GQA, head_dim != dim / heads)."""
    torch.manual_seed(0)    # HF draws the weights from torch's global generator
    hf_model(ModelConfig(**BASE)).save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def lora_trainer(base_dir, ckpt, steps, lora=None, **kw):
    tc = TrainConfig(**dict(dict(steps=steps, accum=2, lr=1e-2, warmup=2, init_from=str(base_dir),
                                 ckpt_path=str(ckpt), ckpt_every=0, seed=5), **kw))
    return Trainer(ModelConfig(**BASE), tc, tokens=small_tokens(BASE["vocab_size"]), log=quiet,
                   lora=lora or LoraConfig(rank=3, targets="q_proj,v_proj,o_proj,down_proj",
                                           layers=2))


def test_lora_training_learns_with_a_frozen_base_and_saves_only_adapters(tmp_path, base_dir):
    t = lora_trainer(base_dir, tmp_path / "lora.ckpt", 20, accum=1, lr=5e-2, warmup=1,
                     lora=LoraConfig(rank=4))
    base = t.model.params.copy()
    assert t.model.grads is None and t.optimizer.m.size == t.model.adapters.params.size
    state = t.sampler.state_dict()
    wins = [t.sampler.next_train() for _ in range(20)]       # the windows of the 20 steps
    t.sampler.load_state_dict(state)
    before = np.mean([t.model.loss(x, t.vocab.compact(y)) for x, y in wins])
    for _ in range(20):
        t.step()
    np.testing.assert_array_equal(t.model.params, base)          # bit-identical
    assert np.abs(t.model.adapters.params).max() > 0
    after = np.mean([t.model.loss(x, t.vocab.compact(y)) for x, y in wins])
    assert after < before - 0.01, (before, after)                 # the adapters learn
    path = t.save()
    head = read_checkpoint_meta(path)
    assert set(head["arrays"]) <= set(LORA_ARRAYS)               # never a base weight
    assert head["meta"]["base"] == {"path": str(base_dir), "hash": base_hash(t.model)}
    n = t.model.adapters.params.size
    assert path.stat().st_size < 3 * 4 * n + 64 * 1024 < 4 * t.model.params.size
    # the checkpoint's adapters, fused into the base, give the trained model's logits
    meta, adapters, _ = load_lora_checkpoint(path)
    x = small_tokens(BASE["vocab_size"], seed=9)[:BASE["seq_len"]]
    fused = Model(ModelConfig(**BASE))
    load_into(fused, str(base_dir))
    fuse(fused, adapters, inplace=True)
    np.testing.assert_allclose(fused.logits(x), t.model.logits(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("stop_at", [3, 4])    # mid-accumulation, and after an update
def test_lora_resume_is_bit_identical(tmp_path, base_dir, stop_at, dropout):
    lora = LoraConfig(rank=3, targets="q_proj,v_proj,o_proj,down_proj", layers=2,
                      dropout=dropout)
    straight = lora_trainer(base_dir, tmp_path / "a.ckpt", 8, lora=lora)
    for _ in range(8):
        straight.step()
    if dropout:     # the dropout is applied: without it the run ends elsewhere
        plain = lora_trainer(base_dir, tmp_path / "c.ckpt", 8)
        for _ in range(8):
            plain.step()
        assert not np.array_equal(plain.model.adapters.params, straight.model.adapters.params)
    first = lora_trainer(base_dir, tmp_path / "b.ckpt", 8, lora=lora)
    for _ in range(stop_at):
        first.step()
    first.save()
    resumed = Trainer.resume(tmp_path / "b.ckpt", tokens=small_tokens(BASE["vocab_size"]),
                             log=quiet)
    assert resumed.model.adapters is not None and resumed.step_count == stop_at
    while resumed.step_count < 8:
        resumed.step()
    for a, b in ((straight.model.adapters.params, resumed.model.adapters.params),
                 (straight.optimizer.m, resumed.optimizer.m),
                 (straight.optimizer.v, resumed.optimizer.v),
                 (straight.model.params, resumed.model.params)):
        np.testing.assert_array_equal(a, b)


def test_lora_resume_on_another_base_is_refused(tmp_path, base_dir):
    t = lora_trainer(base_dir, tmp_path / "a.ckpt", 4)
    t.step()
    path = t.save()
    other = tmp_path / "other"
    hf = hf_model(ModelConfig(**BASE))
    with torch.no_grad():
        hf.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    hf.save_pretrained(other)
    tc = TrainConfig.from_dict(dict(t.tc.to_dict(), init_from=str(other)))
    with pytest.raises(CheckpointError, match="another base"):
        Trainer.resume(path, tc, tokens=small_tokens(BASE["vocab_size"]), log=quiet)


def test_train_stories_lora_then_peft_export_loads_in_peft(tmp_path):
    """train_stories.py --lora from a tiny HF model, then anecy export --format peft: PEFT
    loads the adapters on the HF base and gives the LoRA model's logits."""
    import subprocess
    import sys
    from pathlib import Path

    cfg = ModelConfig.preset("tiny")
    hf = hf_model(cfg)
    hf.save_pretrained(tmp_path / "base")
    root = Path(__file__).resolve().parent.parent
    ckpt = tmp_path / "lora.ckpt"
    r = subprocess.run([sys.executable, str(root / "train_stories.py"), "--preset", "tiny",
                        "--init-from", str(tmp_path / "base"), "--lora", "--lora-rank", "4",
                        "--steps", "4", "--accum", "2", "--lr", "1e-2", "--ckpt", str(ckpt),
                        "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    assert set(read_checkpoint_meta(ckpt)["arrays"]) <= set(LORA_ARRAYS)
    r = subprocess.run([sys.executable, "-m", "anecy", "export", "--ckpt", str(ckpt),
                        "--format", "peft", "--out", str(tmp_path / "peft")], cwd=tmp_path,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    meta, adapters, _ = load_lora_checkpoint(ckpt)
    assert meta["step"] == 4 and np.abs(adapters.params).max() > 0
    ours = Model(cfg, adapters=adapters)
    load_into(ours, str(tmp_path / "base"))
    pm = peft.PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    x = small_tokens(cfg.vocab_size, n=cfg.seq_len, seed=3)
    with torch.no_grad():
        theirs = pm(torch.tensor(x[None].astype(np.int64))).logits[0].numpy()
    assert rel_err(ours.logits(x), theirs) <= 1e-5


# -- the sim backend: merged weights staged, the same training within fp16's bounds ---------
@pytest.mark.parametrize("cfg_name", ["tiny", "qwen3"])
def test_sim_lora_gradients_and_training_agree_with_cpu(cfg_name):
    from test_sim import CONFIGS, RECOMMENDED_LOSS_SCALE, corpus_batch, cosine

    from fp16_bounds import max_rel_err
    if cfg_name == "tiny":
        cfg = ModelConfig.preset("tiny")
    else:
        cfg = ModelConfig(**dict(CONFIGS[cfg_name], vocab_size=32000, seq_len=48))
    vm, x, y = corpus_batch(cfg)
    lc = LoraConfig(rank=3, targets="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                    layers=cfg.n_layers - 1 if cfg.n_layers > 1 else None)
    models = {}
    for backend in ("cpu", "sim"):
        adapters = LoraAdapters(cfg, lc, seed=4)
        rng = np.random.default_rng(4)
        for t in adapters.layout:    # B nonzero: the merged weights differ from the base's
            if t.part == "B":
                adapters.views[t.name][...] = rng.standard_normal(t.shape) * 0.05
        m = Model(cfg, backend=backend, seed=3, adapters=adapters)
        m.set_active_vocab(vm.active_ids)
        base = m.params.copy()
        loss = m.forward_backward(x, y, RECOMMENDED_LOSS_SCALE)
        models[backend] = (m, loss, base)
    (mc, lc_, _), (ms, ls, base_s) = models["cpu"], models["sim"]
    assert np.isfinite(ls) and abs(ls - lc_) <= 1e-2 * abs(lc_), (ls, lc_)
    gc, gs = hf_order(mc.adapters, mc.adapter_grads), hf_order(ms.adapters, ms.adapter_grads)
    for name in gc:
        assert np.all(np.isfinite(gs[name])), name
        assert cosine(gs[name], gc[name]) > 0.99, (name, cosine(gs[name], gc[name]))
    assert max_rel_err(ms.logits(x), mc.logits(x)) < 1e-2
    # an update of the adapters is staged into the merged weights: both backends follow it
    before = ms.logits(x)
    for m in (mc, ms):
        m.adapters.params[...] += np.float32(0.01) * np.sign(m.adapter_grads)
        m.weights_changed()
    assert max_rel_err(ms.logits(x), mc.logits(x)) < 1e-2
    assert max_rel_err(ms.logits(x), before) > 1e-2
    np.testing.assert_array_equal(ms.params, base_s)   # staging merges; the base is untouched
