"""Trainer: optimizer and schedule against PyTorch, exact resume, vocab compaction, learning."""
import json
import math

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from anecy import CheckpointError, ConfigError, DataError, Model, ModelConfig
from anecy.checkpoint import load_checkpoint, save_checkpoint
from anecy.data import TokenSampler
from anecy.trainer import TrainConfig, Trainer, TrainingDiverged

SMALL = dict(dim=32, hidden_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=40,
             seq_len=12)


def small_tokens(n=3000, vocab=40, seed=0):
    # every id occurs, so the vocabulary is complete; a repeating pattern is learnable
    rng = np.random.default_rng(seed)
    base = np.arange(n) % vocab
    noise = rng.integers(0, vocab, n)
    return np.where(rng.random(n) < 0.2, noise, base).astype(np.uint16)


def quiet(*_):
    pass


def test_adamw_schedule_and_clip_match_torch():
    mc = ModelConfig(**SMALL)
    tc = TrainConfig(steps=10, accum=2, lr=2e-3, warmup=3, min_lr_frac=0.1, clip=1.75,
                     weight_decay=0.1, compact_vocab=False, seed=4)
    tokens = small_tokens()
    trainer = Trainer(mc, tc, tokens=tokens, log=quiet)

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=mc.vocab_size, hidden_size=mc.dim, intermediate_size=mc.hidden_dim,
        num_hidden_layers=mc.n_layers, num_attention_heads=mc.n_heads,
        num_key_value_heads=mc.n_kv_heads, max_position_embeddings=mc.seq_len,
        rms_norm_eps=mc.norm_eps, rope_theta=mc.rope_theta, tie_word_embeddings=True)).float()
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in trainer.model.hf_state_dict().items()},
                       strict=False)
    hf.tie_weights()
    decay = [p for n, p in hf.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in hf.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=tc.lr, betas=tc.betas, eps=tc.eps)
    sampler = TokenSampler(tokens, mc.seq_len, tc.seed)

    clipped = []
    for step in range(1, tc.steps + 1):
        rec = trainer.step()
        x, y = sampler.next_train()
        logits = hf(torch.from_numpy(x[None].astype(np.int64))).logits[0]
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y.astype(np.int64)))
        assert abs(loss.item() - rec.loss) < 1e-5
        (loss / tc.accum).backward()
        assert rec.updated == (step % tc.accum == 0)
        if rec.updated:
            norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), tc.clip).item()
            assert abs(norm - rec.grad_norm) <= 1e-4 * norm
            clipped.append(norm > tc.clip)
            for group in opt.param_groups:
                group["lr"] = tc.lr_at(step)
            opt.step()
            opt.zero_grad()
    assert trainer.optimizer.updates == 5
    assert any(clipped) and not all(clipped)  # both sides of the clip were exercised
    ours = trainer.model.hf_state_dict()
    for name, p in hf.named_parameters():
        err = np.abs(ours[name] - p.detach().numpy()).max()
        assert err <= 1e-5, f"{name}: max abs difference {err:.2e}"


def test_lr_schedule_shape():
    tc = TrainConfig(steps=1000, lr=1e-3, warmup=100, min_lr_frac=0.1)
    assert tc.lr_at(50) == pytest.approx(5e-4)
    assert tc.lr_at(100) == pytest.approx(1e-3)
    assert tc.lr_at(550) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert tc.lr_at(1000) == pytest.approx(1e-4)
    lrs = [tc.lr_at(s) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


@pytest.mark.parametrize("stop_at", [4, 5])  # 5 stops in the middle of an accumulation
def test_resume_is_bit_identical(tmp_path, stop_at):
    mc = ModelConfig(**SMALL)
    tokens = small_tokens()

    def config(**kw):
        return TrainConfig(steps=10, accum=2, warmup=2, lr=1e-3, seed=1, compact_vocab=True,
                           ckpt_path=str(tmp_path / "run.ckpt"), **kw)

    straight = Trainer(mc, config(), tokens=tokens, log=quiet)
    straight_losses = [straight.step().loss for _ in range(10)]

    first = Trainer(mc, config(), tokens=tokens, log=quiet)
    losses = [first.step().loss for _ in range(stop_at)]
    first.save()
    del first
    resumed = Trainer.resume(tmp_path / "run.ckpt", tokens=tokens, log=quiet)
    assert resumed.step_count == stop_at
    losses += [resumed.step().loss for _ in range(10 - stop_at)]
    assert losses == straight_losses
    assert np.array_equal(resumed.model.params, straight.model.params)
    assert np.array_equal(resumed.optimizer.m, straight.optimizer.m)
    assert np.array_equal(resumed.optimizer.v, straight.optimizer.v)


def test_resume_rejects_other_model_and_other_data(tmp_path):
    mc = ModelConfig(**SMALL)
    tc = TrainConfig(steps=4, accum=1, ckpt_path=str(tmp_path / "a.ckpt"))
    t = Trainer(mc, tc, tokens=small_tokens(), log=quiet)
    t.step()
    t.save()
    other = ModelConfig(**dict(SMALL, dim=64))
    with pytest.raises(CheckpointError, match="another model.*dim"):
        Trainer.resume(tmp_path / "a.ckpt", model_config=other, tokens=small_tokens(), log=quiet)
    with pytest.raises(CheckpointError, match="other data|tokens"):
        Trainer.resume(tmp_path / "a.ckpt", tokens=small_tokens(n=2000), log=quiet)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError):
        Trainer.resume(tmp_path / "junk.ckpt", tokens=small_tokens(), log=quiet)


def test_compaction_equals_full_softmax_when_every_token_is_active():
    cfg = ModelConfig(**SMALL)
    rng = np.random.default_rng(0)
    tok = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
    tgt = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
    full, compact = Model(cfg, seed=2), Model(cfg, seed=2)
    compact.set_active_vocab(np.arange(cfg.vocab_size))
    assert full.forward_backward(tok, tgt) == compact.forward_backward(tok, tgt)
    # the classifier's share of the embedding gradient is added in another order
    np.testing.assert_allclose(compact.grads, full.grads, rtol=0,
                               atol=1e-6 * np.abs(full.grads).max())


def test_compaction_is_the_softmax_over_active_columns():
    cfg = ModelConfig(**SMALL)
    rng = np.random.default_rng(1)
    active = np.array([0, 3, 4, 9, 17, 30, 39])
    tok = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
    tgt_compact = rng.integers(0, len(active), cfg.seq_len).astype(np.int32)
    m = Model(cfg, seed=2)
    full_logits = m.logits(tok).astype(np.float64)[:, active]
    m.set_active_vocab(active)
    np.testing.assert_allclose(m.logits(tok), full_logits, rtol=1e-6, atol=1e-6)
    shifted = full_logits - full_logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    ref = -logp[np.arange(cfg.seq_len), tgt_compact].mean()
    assert m.forward_backward(tok, tgt_compact) == pytest.approx(ref, rel=1e-6)
    # inactive rows of the (tied) embedding get no classifier gradient
    emb_grad = m.grad_views["model.embed_tokens.weight"]
    inactive = np.setdiff1d(np.arange(cfg.vocab_size), np.concatenate([active, tok]))
    assert not emb_grad[inactive].any()
    assert emb_grad[active].any()


def test_trainer_learns_builtin_corpus():
    # stories15m on the built-in corpus. The loss starts near ln(312 active tokens) = 5.74;
    # the corpus' unigram entropy is 4.97 nats, so ending below 4.0 needs the model to use
    # context, not just token frequencies (measured here: about 2.1 after 100 steps).
    mc = ModelConfig.preset("stories15m")
    tc = TrainConfig(steps=100, accum=1, warmup=10, lr=1e-3, eval_every=100, eval_batches=2)
    t = Trainer(mc, tc, log=quiet)
    assert t.vocab.n_active == 312
    losses = [t.step().loss for _ in range(tc.steps)]
    assert np.mean(losses[:5]) > 5.0
    assert np.mean(losses[-10:]) < 4.0
    assert t.last_val_loss < 4.0


def test_metrics_and_records(tmp_path):
    mc = ModelConfig(**SMALL)
    tc = TrainConfig(steps=6, accum=3, warmup=0, metrics_path=str(tmp_path / "m.jsonl"),
                     ckpt_path=str(tmp_path / "c.ckpt"), eval_every=3)
    t = Trainer(mc, tc, tokens=small_tokens(), log=quiet)
    summary = t.run(progress=False)
    rows = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["updated"] for r in rows] == [False, False, True, False, False, True]
    assert rows[2]["grad_norm"] > 0 and rows[2]["val_loss"] > 0
    for key in ("kernels", "io", "rms", "classifier", "elementwise", "dw_wait", "optimizer"):
        assert key in rows[0]["timings"]
    assert summary["steps"] == 6 and not summary["interrupted"]
    assert (tmp_path / "c.ckpt").exists()


def test_evaluation_is_the_training_loss_without_gradients():
    mc = ModelConfig(**SMALL)
    t = Trainer(mc, TrainConfig(steps=4, accum=2, eval_batches=3), tokens=small_tokens(),
                log=quiet)
    t.step()                      # mid-accumulation: the pending gradients must survive
    grads = t.model.grads.copy()
    got = t.evaluate()
    assert np.array_equal(t.model.grads, grads)
    ref = [torch.nn.functional.cross_entropy(
               torch.from_numpy(t.model.logits(x).astype(np.float64)),
               torch.from_numpy(t.vocab.compact(y).astype(np.int64))).item()
           for x, y in t.sampler.val_batches(3)]
    assert got == pytest.approx(np.mean(ref), rel=1e-6)
    x, y = t.sampler.val_batches(1)[0]
    assert t.model.loss(x, t.vocab.compact(y)) == t.model.forward_backward(x, t.vocab.compact(y))


def test_nan_loss_is_a_clear_error():
    mc = ModelConfig(**SMALL)
    t = Trainer(mc, TrainConfig(steps=3, accum=1), tokens=small_tokens(), log=quiet)
    t.model.params[:] = np.nan
    with pytest.raises(TrainingDiverged, match="nan"):
        t.step()


def test_public_names():
    import anecy
    assert anecy.Trainer is Trainer and anecy.TrainConfig is TrainConfig
    assert anecy.TrainingDiverged is TrainingDiverged


# -- finite checks and dynamic loss scaling -------------------------------------------------
def overflow_at(trainer, microsteps):
    """Make the gradients of the given microsteps (1-based) overflow, as fp16 ones do."""
    inner = trainer.model.forward_backward

    def forward_backward(x, y, loss_scale=1.0):
        loss = inner(x, y, loss_scale)
        if trainer.step_count + 1 in microsteps:
            trainer.model.grads[7] = np.inf
        return loss
    trainer.model.forward_backward = forward_backward
    return trainer


def sim_config(tmp_path, **kw):
    d = dict(steps=12, accum=2, warmup=2, lr=1e-3, seed=3, backend="sim", loss_scale_growth=2,
             ckpt_path=str(tmp_path / "sim.ckpt"))
    d.update(kw)
    return TrainConfig(**d)


def test_dynamic_loss_scale_skips_one_update_and_halves_the_scale(tmp_path):
    mc, tokens = ModelConfig(**SMALL), small_tokens()
    t = overflow_at(Trainer(mc, sim_config(tmp_path), tokens=tokens, log=quiet), {3})
    assert t.optimizer.scale.dynamic and t.optimizer.scale.value == 4096.0
    recs = [t.step() for _ in range(2)]          # update 1 (clean)
    before = t.model.params.copy()
    recs += [t.step() for _ in range(2)]         # microsteps 3-4: the overflowing update
    assert recs[3].skipped and not recs[3].updated and recs[3].grad_norm is None
    assert np.array_equal(t.model.params, before) and not t.model.grads.any()
    scale = t.optimizer.scale
    assert (scale.value, scale.skipped, t.optimizer.updates, scale.clean_updates) == \
        (2048.0, 1, 1, 0)
    recs += [t.step() for _ in range(4)]         # two clean updates: the scale doubles
    assert (scale.value, scale.skipped, t.optimizer.updates) == (4096.0, 1, 3)
    assert [r.skipped for r in recs] == [False, False, False, True] + [False] * 4
    assert [r.loss_scale for r in recs] == [4096.0] * 4 + [2048.0] * 4
    summary = t.report(8, 1.0)
    assert summary["skipped"] == 1 and summary["updates"] == 3


# after the skip, mid-accumulation, after an update (save runs its check), mid-growth
@pytest.mark.parametrize("stop_at", [4, 5, 6, 7])
def test_resume_across_a_skipped_update_is_bit_identical(tmp_path, stop_at):
    mc, tokens = ModelConfig(**SMALL), small_tokens()
    straight = overflow_at(Trainer(mc, sim_config(tmp_path), tokens=tokens, log=quiet), {3})
    straight_losses = [straight.step().loss for _ in range(12)]
    assert straight.optimizer.scale.skipped == 1

    first = overflow_at(Trainer(mc, sim_config(tmp_path), tokens=tokens, log=quiet), {3})
    losses = [first.step().loss for _ in range(stop_at)]
    first.save()
    resumed = Trainer.resume(tmp_path / "sim.ckpt", tokens=tokens, log=quiet)
    ours, theirs = resumed.optimizer.scale, first.optimizer.scale
    assert (ours.value, ours.clean_updates, ours.skipped) == \
        (theirs.value, theirs.clean_updates, theirs.skipped)
    losses += [resumed.step().loss for _ in range(12 - stop_at)]
    assert losses == straight_losses
    # the run that saved goes on exactly as if it had not (the save's check leaves no trace)
    assert [first.step().loss for _ in range(12 - stop_at)] == straight_losses[stop_at:]
    for t in (resumed, first):
        assert np.array_equal(t.model.params, straight.model.params)
        assert np.array_equal(t.optimizer.m, straight.optimizer.m)
        assert np.array_equal(t.optimizer.v, straight.optimizer.v)
        assert t.optimizer.scale.value == straight.optimizer.scale.value


def test_a_static_scale_or_the_cpu_backend_stops_on_a_non_finite_gradient(tmp_path):
    mc, tokens = ModelConfig(**SMALL), small_tokens()
    for cfg in (sim_config(tmp_path, loss_scale=1024.0), sim_config(tmp_path, backend="cpu")):
        t = overflow_at(Trainer(mc, cfg, tokens=tokens, log=quiet), {3})
        assert not t.optimizer.scale.dynamic
        t.step(), t.step(), t.step()
        with pytest.raises(TrainingDiverged, match="gradient norm is (inf|nan) at step 4"):
            t.step()
        with pytest.raises(TrainingDiverged, match="never saved"):
            t.save()


def test_a_checkpoint_waits_until_its_state_gives_a_finite_loss(tmp_path):
    mc, tokens = ModelConfig(**SMALL), small_tokens()
    path = tmp_path / "run.ckpt"
    t = Trainer(mc, TrainConfig(steps=20, accum=1, ckpt_path=str(path)), tokens=tokens, log=quiet)
    t.step(), t.step()
    t.guard.save_when_checked()   # after an update: written, held back
    assert not path.exists() and t.guard.staged is not None
    t.step()                 # its state gave a finite loss: now it is the checkpoint
    assert load_checkpoint(path)[0]["step"] == 2 and t.guard.staged is None
    good = path.read_bytes()
    t.guard.save_when_checked()   # step 3, held back; then its weights turn out to give NaN
    t.model.views["model.norm.weight"][:] = np.float32(3e38)
    t.model.weights_changed()
    with pytest.raises(TrainingDiverged, match=r"last good state is checkpoint .*run.ckpt "
                                               r"\(step 2\)"):
        t.step()
    assert path.read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    with pytest.raises(TrainingDiverged):
        t.save()
    assert path.read_bytes() == good


def test_save_checks_a_state_that_has_not_run_yet(tmp_path):
    mc, tokens = ModelConfig(**SMALL), small_tokens()
    path = tmp_path / "run.ckpt"
    t = Trainer(mc, TrainConfig(steps=20, accum=1, ckpt_path=str(path)), tokens=tokens, log=quiet)
    t.step()
    t.save()                 # the check (next microstep, undone) leaves no trace
    drawn, params = t.sampler.drawn, t.model.params.copy()
    assert not t.model.grads.any()
    t.model.views["model.norm.weight"][:] = np.float32(3e38)
    t.model.weights_changed()
    t.guard.checked = False       # as after an update that made these weights
    with pytest.raises(TrainingDiverged, match="checked before saving"):
        t.save()
    assert t.sampler.drawn == drawn
    assert np.array_equal(load_checkpoint(path)[1]["params"], params)


def test_the_fused_check_catches_parameters_made_infinite(tmp_path):
    mc, tokens = ModelConfig(**SMALL), small_tokens()
    t = Trainer(mc, TrainConfig(steps=20, accum=1, warmup=0, lr=1e37), tokens=tokens, log=quiet)
    with pytest.raises(TrainingDiverged, match="made parameters non-finite.*no checkpoint"):
        for _ in range(20):
            t.step()


def test_resume_refuses_a_checkpoint_with_non_finite_values(tmp_path):
    mc, tokens = ModelConfig(**SMALL), small_tokens()
    path = tmp_path / "run.ckpt"
    t = Trainer(mc, TrainConfig(steps=4, accum=1, ckpt_path=str(path)), tokens=tokens, log=quiet)
    t.step()
    t.save()
    meta, arrays = load_checkpoint(path)
    arrays["adam_v"][5] = np.nan   # as an older version could have saved it
    save_checkpoint(path, meta, arrays)
    with pytest.raises(CheckpointError, match="adam_v holds NaN"):
        Trainer.resume(path, tokens=tokens, log=quiet)


def test_token_ids_must_be_integers_and_the_loss_scale_sane():
    mc, tokens = ModelConfig(**SMALL), small_tokens()
    with pytest.raises(DataError, match="integer"):
        Trainer(mc, TrainConfig(steps=2), tokens=tokens.astype(np.float32), log=quiet)
    m = Model(mc)
    x = np.arange(mc.seq_len) % mc.vocab_size
    with pytest.raises(ConfigError, match="integer"):
        m.forward_backward(x + 0.7, x)
    with pytest.raises(ConfigError, match="integer"):
        m.logits(x.astype(np.float64))
    for bad in (0.0, -1.0, math.nan, math.inf, 1e39):
        with pytest.raises(ConfigError, match="loss_scale"):
            m.forward_backward(x, x, bad)
    assert not m.grads.any()
    for bad in (0.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="loss_scale"):
            TrainConfig(loss_scale=bad)
