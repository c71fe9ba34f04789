"""Training on examples files: masked loss, packing, the update-wide normalisation, resume,
sim against cpu, bad input. Model math is checked against HF transformers + PyTorch
autograd with labels -100 on the same examples (tiny random models built offline)."""
import json
import math
import subprocess
import sys
from contextlib import ExitStack

import numpy as np
import pytest
import torch
from test_model import hf_model

from anecy import Model, ModelConfig
from anecy.chat_data import ExamplesWriter
from anecy.config import TrainConfig
from anecy.data import ExampleSampler, Window, open_examples, token_dtype
from anecy.prepare import write_sidecar
from anecy.trainer import Trainer
from fp16_bounds import max_rel_err

LLAMA = dict(dim=48, hidden_dim=80, n_layers=2, n_heads=6, n_kv_heads=2, vocab_size=61,
             seq_len=40, rope_style="half")
QWEN3 = dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
             vocab_size=67, seq_len=40, rope_style="half", qk_norm=True, norm_eps=1e-6,
             rope_theta=1e6)


def quiet(*_):
    pass


def make_examples(rng, n, vocab_size, lengths=(4, 16), prompt_frac=0.5):
    """n chat-like examples: a prompt (unscored) then an answer (scored), as (ids, mask)."""
    out = []
    for _ in range(n):
        length = int(rng.integers(*lengths))
        ids = rng.integers(0, vocab_size, length).astype(np.int32)
        mask = np.zeros(length, bool)
        mask[max(1, int(length * prompt_frac)):] = True
        out.append((ids, mask))
    return out


def write_examples(path, examples, vocab_size, seq_len, val=None):
    """An examples file (with its held-out file) written by prepare's own writer."""
    dtype = token_dtype(vocab_size)
    written = []
    with ExitStack() as stack:
        for p, exs in ((path, examples), (path.with_name(path.stem + ".val.bin"), val)):
            if exs is None:
                continue
            w = ExamplesWriter(p, dtype)
            w.open(stack)
            for ids, mask in exs:
                w.add(ids, mask)
            w.finish()
            written.append(w)
    meta = {"format": "anecy-tokens-2", "tokenizer": {"kind": "test", "path": "none"},
            "vocab_size": vocab_size, "dtype": dtype.name, "bos_id": None, "eos_id": None,
            "chat_template": None, "end_of_turn_id": None, "mask_prompt": True,
            "seq_len": seq_len, "sources": []}

    def counts(w):
        return {"examples": w.examples, "tokens": w.tokens, "scored_tokens": w.scored,
                "max_example_tokens": w.longest}

    train = dict(meta, split="train" if val else "all", **counts(written[0]))
    if val:
        train["val"] = dict(path=written[1].path.name, fraction=0.1, **counts(written[1]))
        write_sidecar(written[1].path, dict(meta, split="val", **counts(written[1])))
    write_sidecar(path, train)
    return path


def hf_masked_grads(hf, examples, n_scored):
    """HF's gradient of sum over the examples' scored tokens of CE / n_scored, each example
    run alone with labels -100 where unscored (HF shifts the labels itself)."""
    hf.zero_grad()
    total = 0.0
    for ids, mask in examples:
        labels = torch.tensor(np.where(mask, ids, -100).astype(np.int64))[None]
        logits = hf(torch.tensor(ids.astype(np.int64))[None]).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:],
                                                 ignore_index=-100, reduction="sum")
        (loss / n_scored).backward()
        total += loss.item()
    return total / n_scored, {n: p.grad.numpy().copy() for n, p in hf.named_parameters()}


def assert_grads_close(ours, ref, tol=2e-4):
    grads = ours.hf_grads()
    for name, r in ref.items():
        if name not in grads:      # lm_head of a tied model is the embedding
            continue
        err = np.linalg.norm(grads[name] - r) / np.linalg.norm(r)
        assert err <= tol, f"{name}: relative error {err:.2e}"


class Listed:
    """Examples held in memory, as Window and ExampleSampler read them."""

    def __init__(self, examples):
        self.items = examples
        self.lengths = np.array([len(ids) for ids, _ in examples])
        self.path = "listed"

    def __len__(self):
        return len(self.items)

    def __getitem__(self, k):
        return self.items[k]


@pytest.mark.parametrize("fields", [LLAMA, QWEN3], ids=["llama", "qwen3"])
def test_packed_masked_gradients_equal_hf_labels_minus_100(fields):
    cfg = ModelConfig(**fields)
    hf = hf_model(cfg)
    ours = Model(cfg)
    ours.load_hf_state_dict(hf.state_dict())
    examples = make_examples(np.random.default_rng(1), 4, cfg.vocab_size, lengths=(5, 11))
    win = Window(Listed(examples), range(4), cfg.seq_len)
    assert sum(len(ids) - 1 for ids, _ in examples) <= cfg.seq_len   # one window holds them
    n_scored = sum(int(mask[1:].sum()) for _, mask in examples)
    assert win.scored == n_scored
    ref_loss, ref = hf_masked_grads(hf, examples, n_scored)
    loss = ours.forward_backward(win.x, win.y, weights=win.weights / np.float32(n_scored),
                                 positions=win.positions, segment_starts=win.segment_starts)
    assert abs(loss - ref_loss) <= 1e-5 * ref_loss
    assert_grads_close(ours, ref)


@pytest.mark.parametrize("fields", [LLAMA, QWEN3], ids=["llama", "qwen3"])
def test_packed_window_gives_each_example_what_it_gets_alone(fields):
    cfg = ModelConfig(**fields)
    m = Model(cfg, seed=4)
    examples = make_examples(np.random.default_rng(2), 3, cfg.vocab_size, lengths=(8, 14))
    packed = Window(Listed(examples), range(3), cfg.seq_len)
    logits = m.logits(packed.x, positions=packed.positions,
                      segment_starts=packed.segment_starts)
    at, alone_grads = 0, np.zeros_like(m.grads)
    for k, (ids, _) in enumerate(examples):
        alone = Window(Listed(examples), [k], cfg.seq_len)
        n = len(ids) - 1
        ref = m.logits(alone.x)[:n]     # one example at the start: plain causal attention
        assert max_rel_err(logits[at:at + n], ref) < 1e-5
        m.forward_backward(alone.x, alone.y, weights=alone.weights)
        alone_grads += m.grads
        m.zero_grad()
        at += n
    m.forward_backward(packed.x, packed.y, weights=packed.weights, positions=packed.positions,
                       segment_starts=packed.segment_starts)
    # the padding's embedding rows aside (no gradient reaches them either way)
    assert np.linalg.norm(m.grads - alone_grads) <= 1e-5 * np.linalg.norm(alone_grads)


def test_without_a_layout_the_weighted_step_is_the_mean():
    cfg = ModelConfig(**LLAMA)
    rng = np.random.default_rng(3)
    x = rng.integers(0, cfg.vocab_size, cfg.seq_len)
    y = rng.integers(0, cfg.vocab_size, cfg.seq_len)
    a, b = Model(cfg, seed=1), Model(cfg, seed=1)
    la = a.forward_backward(x, y)
    lb = b.forward_backward(x, y, weights=np.full(cfg.seq_len, 1 / cfg.seq_len, np.float32))
    assert abs(la - lb) <= 1e-6 * la
    np.testing.assert_allclose(b.grads, a.grads, rtol=0, atol=1e-6 * np.abs(a.grads).max())


def examples_run(tmp_path, fields=LLAMA, n=40, val=False, **kw):
    cfg = ModelConfig(**fields)
    rng = np.random.default_rng(7)
    path = write_examples(tmp_path / "chats.bin", make_examples(rng, n, cfg.vocab_size),
                          cfg.vocab_size, cfg.seq_len,
                          val=make_examples(rng, 6, cfg.vocab_size) if val else None)
    tc = dict(steps=8, accum=3, warmup=1, lr=1e-3, seed=2, data_path=str(path),
              compact_vocab=False, ckpt_path=str(tmp_path / "run.ckpt"))
    tc.update(kw)
    return cfg, path, TrainConfig(**tc)


def test_accumulation_normalises_over_the_whole_update(tmp_path):
    cfg, path, tc = examples_run(tmp_path, fields=QWEN3)
    t = Trainer(cfg, tc, log=quiet)
    hf = hf_model(cfg)
    hf.load_state_dict({k: torch.tensor(v) for k, v in t.model.hf_state_dict().items()},
                       strict=False)   # a tied lm_head is the embedding
    hf.tie_weights()
    windows = [t.sampler.window(i) for i in range(3)]
    counts = [w.scored for w in windows]
    assert len(set(counts)) > 1, "the test wants microsteps of unequal scored tokens"
    losses = [t.step().loss for _ in range(2)]         # 2 of the 3 microsteps of the update
    ex = open_examples(path)
    members = [t.sampler._members(i) for i in range(2)]
    per_step = [[ex[k] for k in m] for m in members]
    ref_loss0, _ = hf_masked_grads(hf, per_step[0], counts[0])
    assert abs(losses[0] - ref_loss0) <= 1e-5 * ref_loss0    # reported: the microstep's mean
    # the gradient: of the sum over both microsteps' scored tokens / all three's count
    _, ref = hf_masked_grads(hf, per_step[0] + per_step[1], sum(counts))
    assert_grads_close(t.model, ref)


def test_useful_fraction_and_metrics(tmp_path):
    cfg, path, tc = examples_run(tmp_path, val=True, eval_every=4,
                                 metrics_path=str(tmp_path / "m.jsonl"))
    lines = []
    summary = Trainer(cfg, tc, log=lines.append).run(progress=False)
    assert 0 < summary["useful_fraction"] <= 1 and summary["useful_tokens_per_s"] > 0
    assert any(line.startswith("useful tokens:") for line in lines)
    recs = [json.loads(line) for line in open(tmp_path / "m.jsonl")]
    assert all(0 < r["useful_fraction"] <= 1 for r in recs)
    assert recs[3]["val_loss"] is not None and math.isfinite(recs[3]["val_loss"])


def test_val_loss_is_the_mean_over_held_out_scored_tokens(tmp_path):
    cfg, path, tc = examples_run(tmp_path, val=True, eval_every=1)
    t = Trainer(cfg, tc, log=quiet)
    hf = hf_model(cfg)
    hf.load_state_dict({k: torch.tensor(v) for k, v in t.model.hf_state_dict().items()},
                       strict=False)   # a tied lm_head is the embedding
    hf.tie_weights()
    val = open_examples(path.with_name("chats.val.bin"))
    n = sum(int(m.sum()) for _, m in val)
    ref, _ = hf_masked_grads(hf, list(val), n)
    assert abs(t.evaluate() - ref) <= 1e-5 * ref


def test_packing_never_cuts_an_example_and_covers_each_once_an_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 30, 500)

    class Fake:
        def __init__(self):
            self.lengths = lengths
            self.path = "fake"

        def __len__(self):
            return len(lengths)

    s = ExampleSampler(Fake(), 64, seed=5)
    plan = s._pack(0)
    seen = sorted(k for w in plan for k in w)
    assert seen == list(range(500))
    assert all(sum(lengths[k] - 1 for k in w) <= 64 for w in plan)
    assert s._pack(0) == plan and s._pack(1) != plan      # fixed per epoch, new each epoch


def test_packing_keeps_most_of_the_window_useful():
    # chat-like examples averaging a third of the window, answers at their ends
    S = 256
    examples = make_examples(np.random.default_rng(3), 600, 100, lengths=(20, 151))
    assert abs(np.mean([len(ids) for ids, _ in examples]) / S - 1 / 3) < 0.05
    s = ExampleSampler(Listed(examples), S, seed=0)
    windows = [s.window(i) for i in range(len(s._pack(0)))]
    useful = sum(w.useful for w in windows) / (len(windows) * S)
    assert useful >= 0.8, useful
    alone = ExampleSampler(Listed(examples), S, seed=0, one_per_window=True)
    assert sum(alone.window(i).useful for i in range(600)) / (600 * S) < 0.4


@pytest.mark.parametrize("stop_at", [4, 5])
def test_resume_on_examples_is_bit_exact(tmp_path, stop_at):
    cfg, path, tc = examples_run(tmp_path, steps=10, accum=2, compact_vocab=True)
    straight = Trainer(cfg, tc, log=quiet)
    straight_losses = [straight.step().loss for _ in range(10)]
    first = Trainer(cfg, tc, log=quiet)
    losses = [first.step().loss for _ in range(stop_at)]
    first.save()
    del first
    resumed = Trainer.resume(tmp_path / "run.ckpt", log=quiet)
    losses += [resumed.step().loss for _ in range(10 - stop_at)]
    assert losses == straight_losses
    assert np.array_equal(resumed.model.params, straight.model.params)
    assert resumed.useful_tokens == straight.useful_tokens


def test_sim_agrees_with_cpu_one_example_a_window(tmp_path):
    cfg, path, tc = examples_run(tmp_path, fields=dict(QWEN3, seq_len=32), steps=1, accum=1)
    runs = {}
    for backend in ("cpu", "sim"):
        t = Trainer(cfg, TrainConfig(**dict(tc.to_dict(), backend=backend)), log=quiet)
        # both one example a window (the sim design); cpu given the same windows
        t.sampler.one_per_window = True
        loss, _ = t.next_microstep(t.optimizer.scale.value)
        runs[backend] = (loss, t.model.hf_grads(), t.optimizer.scale.value)
    (lc, gc, sc), (ls, gs, ss) = runs["cpu"], runs["sim"]
    assert abs(ls - lc) <= 1e-2 * lc
    for name in gc:
        assert max_rel_err(gs[name] / ss, gc[name] / sc) < 5e-2, name


def test_sim_refuses_packing_layouts():
    m = Model(ModelConfig.preset("tiny"), backend="sim")
    S = m.config.seq_len
    with pytest.raises(ValueError, match="cpu backend"):
        m.forward_backward(np.zeros(S, int), np.zeros(S, int), positions=np.zeros(S, int))


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "anecy", "train", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_bad_examples_files_are_one_line_exit_2(tmp_path):
    rng = np.random.default_rng(0)
    tiny = ModelConfig.preset("tiny")
    big = write_examples(tmp_path / "big.bin", make_examples(rng, 5, 40000), 40000, 64)
    long = write_examples(tmp_path / "long.bin",
                          make_examples(rng, 5, 100, lengths=(60, 64)), 100, 64)
    for data, extra, words in ((big, [], "vocabulary"), (long, ["--seq-len", "32"], "window")):
        r = run_cli("--preset", "tiny", "--steps", "1", "--data", str(data), "--no-progress",
                    "--ckpt", str(tmp_path / "x.ckpt"), *extra, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    assert tiny.seq_len == 64


def test_train_cli_on_examples_with_seq_len(tmp_path):
    rng = np.random.default_rng(0)
    data = write_examples(tmp_path / "chats.bin", make_examples(rng, 30, 100), 100, 48)
    r = run_cli("--preset", "tiny", "--steps", "3", "--accum", "1", "--seq-len", "48",
                "--data", str(data), "--no-progress", "--backend", "cpu",
                "--ckpt", str(tmp_path / "x.ckpt"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "seq 48" in r.stdout and "useful tokens:" in r.stdout
    r = run_cli("--resume", "--steps", "4", "--seq-len", "64", "--data", str(data),
                "--ckpt", str(tmp_path / "x.ckpt"), cwd=tmp_path)
    assert r.returncode == 2 and "keeps them" in r.stderr


def test_attention_key_starts_keep_segments_apart():
    from anecy._testing import py_attention_bwd, py_attention_fwd
    rng = np.random.default_rng(0)
    n_heads, hd, cuts = 2, 8, [0, 5, 12, 20]
    S = cuts[-1]
    q, k, v, da = (rng.standard_normal((n_heads * hd, S)).astype(np.float32)
                   for _ in range(4))
    key_start = np.concatenate([np.full(b - a, a, np.int32) for a, b in zip(cuts, cuts[1:])])
    out = py_attention_fwd(q, k, v, n_heads, n_heads, key_start=key_start)
    grads = py_attention_bwd(q, k, v, da, n_heads, key_start=key_start)[:3]
    for a, b in zip(cuts, cuts[1:]):
        part = [np.ascontiguousarray(t[:, a:b]) for t in (q, k, v, da)]
        np.testing.assert_allclose(out[:, a:b], py_attention_fwd(*part[:3], n_heads, n_heads),
                                   rtol=1e-5, atol=1e-6)
        for got, ref in zip(grads, py_attention_bwd(*part, n_heads)[:3]):
            np.testing.assert_allclose(got[:, a:b], ref, rtol=1e-5, atol=1e-6)


def test_resume_refuses_the_other_kind_of_data(tmp_path):
    from anecy.errors import AnecyError
    cfg, path, tc = examples_run(tmp_path, steps=4, accum=1)
    t = Trainer(cfg, tc, log=quiet)
    t.step()
    t.save()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, len(t.tokens))
    with pytest.raises(AnecyError, match="examples file"):
        Trainer.resume(tmp_path / "run.ckpt", TrainConfig(**dict(tc.to_dict(), data_path=None)),
                       tokens=tokens, log=quiet)
