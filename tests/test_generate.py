"""Decoding with a KV cache against HF generate(), llama2.c's run.c and the training engine;
the sampler; the sample command."""
from pathlib import Path

import numpy as np
import pytest
import torch
from test_model import CASES, hf_model

from anecy import AnecyError, ConfigError, Model, ModelConfig
from anecy.cli import anecy_main
from anecy.generate import (
    Decoder,
    SamplingConfig,
    generate,
    next_token_probs,
    sample,
    stream_text,
)
from conftest import require_shared


def sharp_hf_model(cfg: ModelConfig, scale=8.0):
    """A tiny random HF model with weights large enough that greedy text varies and the
    argmax is never a near-tie."""
    hf = hf_model(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() == 2:
                p.mul_(scale)
    return hf


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_equals_hf_generate(case):
    cfg = ModelConfig(**dict(CASES[case], seq_len=40))
    hf = sharp_hf_model(cfg)
    ours = Model(cfg)
    ours.load_hf_state_dict(hf.state_dict())
    prompt = [int(t) for t in np.random.default_rng(1).integers(0, cfg.vocab_size, 7)]
    n_new = 40 - len(prompt)
    hf.generation_config.eos_token_id = None   # no stop token: all n_new tokens compared
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n_new,
                          min_new_tokens=0)[0, len(prompt):].tolist()
    assert len(ref) == n_new and len(set(ref)) > 3   # the text varies
    for threads in (1, 2):
        got = list(generate(ours, prompt, n_new, SamplingConfig(temperature=0),
                            threads=threads))
        assert got == ref, threads


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_do_not_depend_on_the_thread_count(case):
    """Bit for bit: every row's dot product is summed in one order whoever computes it. The
    prompt is longer than one prefill chunk (128 positions) and the weights large, so
    attention over many positions, RoPE far out and every head split are exercised."""
    cfg = ModelConfig(**dict(CASES[case], seq_len=160))
    model = Model(cfg, seed=3)
    model.params *= 4
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, 160).tolist()
    runs = []
    for threads in (1, 2, 3):
        dec = Decoder(model, threads=threads)
        assert dec.threads == threads
        logits = [dec.step(tokens[:140])]                  # two prefill chunks
        logits += [dec.step([t]) for t in tokens[140:]]    # then a token per step
        runs.append(np.array(logits))
    assert np.isfinite(runs[0]).all() and np.abs(runs[0]).max() > 1
    for other in runs[1:]:
        assert np.array_equal(runs[0], other)


def test_a_long_prompt_in_chunks_equals_the_engine_window():
    cfg = ModelConfig(**dict(CASES["qwen3-gqa4"], seq_len=150))
    model = Model(cfg, seed=2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 150).astype(np.int32)
    ref = model.logits(tokens)
    dec = Decoder(model, threads=2)
    scale = np.abs(ref).max()
    assert np.abs(dec.step(tokens[:149]) - ref[148]).max() <= 1e-5 * scale
    assert np.abs(dec.step(tokens[149:]) - ref[149]).max() <= 1e-5 * scale
    assert dec.prefilled == 149


def test_q8_rows_round_trip_within_half_a_step():
    from anecy._decode import quantize_q8
    w = np.random.default_rng(0).standard_normal((7, 70)).astype(np.float32)
    w[3, 32:64] = 0   # an all-zero block
    q, scales = quantize_q8(w)
    assert q.dtype == np.int8 and q.shape == w.shape and scales.shape == (7, 3)
    per_weight = np.repeat(scales, 32, axis=1)[:, :70]
    assert np.all(np.abs(q.astype(np.float32) * per_weight - w) <= per_weight / 2 * 1.0001)
    assert np.abs(q).max() == 127 and not q[3, 32:64].any()


@pytest.mark.parametrize("case", ["gqa-headdim-untied-half", "qwen3-gqa4"])
def test_q8_decodes_the_rounded_weights(case):
    """q8 decoding is the fp32 model with each matrix replaced by its rounding (a prompt
    fed one token per step, so every position takes the q8 path), and thread-invariant.
    Untied models: the embedding's rows are looked up in fp32, only the classifier and the
    layers' matrices are rounded."""
    from anecy._decode import quantize_q8
    cfg = ModelConfig(**dict(CASES[case], seq_len=24, tie_embeddings=False))
    model = Model(cfg, seed=4)
    model.params *= 3
    rounded = Model(cfg)
    rounded.params[:] = model.params
    for name, view in rounded.views.items():
        if view.ndim == 2 and name != "model.embed_tokens.weight":
            q, scales = quantize_q8(view)
            view[...] = q.astype(np.float32) * np.repeat(scales, 32, axis=1)[:, :view.shape[1]]
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, 24).tolist()
    runs = {}
    for threads in (1, 2):
        dec = Decoder(model, threads=threads, dtype="q8")
        runs[threads] = np.array([dec.step([t]) for t in tokens])
    exact = Decoder(model, threads=1)
    ref = Decoder(rounded, threads=1)
    want = np.array([ref.step([t]) for t in tokens])
    fp32 = np.array([exact.step([t]) for t in tokens])
    scale = np.abs(want).max()
    assert np.array_equal(runs[1], runs[2])
    assert np.abs(runs[1] - want).max() <= 1e-5 * scale
    assert np.abs(fp32 - want).max() > 1e-4 * scale   # the rounding is visible at all


def test_q8_from_the_sample_command(capsys):
    args = ["--init-from", DATA / "llama2c_tied_v0.bin", "--tokenizer",
            require_shared("data", "llama2-tokenizer", "tokenizer.bin", why="decodes"),
            "--temperature", 0, "--max-new-tokens", 20]
    code, f32, err = run_sample(args, capsys)
    assert code == 0, err
    code, q8, err = run_sample(args + ["--dtype", "q8", "--threads", 2], capsys)
    assert code == 0 and "tokens/s" in err and len(q8) > 20
    with pytest.raises(SystemExit) as stop:
        anecy_main(["sample", "--init-from", str(DATA / "llama2c_tied_v0.bin"), "--dtype",
                    "q4"])
    assert stop.value.code == 2 and "--dtype" in capsys.readouterr().err


def test_q8_loss_benchmark_quick():
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "bench/bench_q8_loss.py", "--quick"], cwd=root,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr
    assert "q8 - f32" in proc.stdout


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_counts(bad):
    with pytest.raises(ConfigError, match="threads"):
        Decoder(Model(ModelConfig(**CASES["gqa-interleaved"])), threads=bad)


def test_bad_dtype():
    with pytest.raises(ConfigError, match="dtype"):
        Decoder(Model(ModelConfig(**CASES["gqa-interleaved"])), dtype="q4")


@pytest.mark.parametrize("case", ["gqa-interleaved", "qwen3-gqa4"])
def test_cached_logits_equal_the_engine_window(case):
    cfg = ModelConfig(**CASES[case])
    model = Model(cfg, seed=2)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
    ref = model.logits(tokens)
    dec = Decoder(model)
    scale = np.abs(ref).max()
    first = dec.step(tokens[:5])   # the prompt at once ...
    assert np.abs(first - ref[4]).max() <= 1e-5 * scale
    for i in range(5, cfg.seq_len):   # ... then one token per step from the cache
        out = dec.step(tokens[i:i + 1])
        assert np.abs(out - ref[i]).max() <= 1e-5 * scale, i
    with pytest.raises(ConfigError, match="context"):
        dec.step([0])
    dec.reset()
    assert np.abs(dec.step(tokens[:1]) - ref[0]).max() <= 1e-5 * scale


def test_compacted_model_scores_only_its_active_vocabulary():
    cfg = ModelConfig(**CASES["gqa-interleaved"])
    model = Model(cfg, seed=2)
    tokens = np.arange(cfg.seq_len, dtype=np.int32) % cfg.vocab_size
    full = model.logits(tokens)[-1]
    active = np.arange(0, cfg.vocab_size, 3)
    model.set_active_vocab(active)
    out = Decoder(model).step(tokens)
    assert out.shape == (cfg.vocab_size,)
    assert np.abs(out[active] - full[active]).max() <= 1e-5 * np.abs(full).max()
    assert np.all(np.isneginf(np.delete(out, active)))
    ids = generate(model, [0], 10, SamplingConfig(temperature=2.0, seed=0))
    assert set(ids) <= set(active.tolist())


def test_stops_at_stop_ids_max_new_tokens_and_context():
    cfg = ModelConfig(**dict(CASES["gqa-interleaved"], seq_len=30))
    model = Model(cfg, seed=4)
    model.params[:] *= 6
    model.weights_changed()
    greedy = SamplingConfig(temperature=0)
    full = list(generate(model, [1, 2, 3], 100, greedy))
    assert len(full) == 30 - 3 + 1   # the context fills; the last token needs no position
    assert list(generate(model, [1, 2, 3], 5, greedy)) == full[:5]
    assert list(generate(model, [1, 2, 3], 0, greedy)) == []
    stop = full[6]
    cut = full.index(stop)
    assert list(generate(model, [1, 2, 3], 100, greedy, stop_ids=[stop])) == full[:cut]
    with pytest.raises(ConfigError, match="at least one token"):
        list(generate(model, [], 5, greedy))
    with pytest.raises(ConfigError, match="more than the context"):
        list(generate(model, [1] * 31, 5, greedy))
    with pytest.raises(ConfigError, match="token ids"):
        list(generate(model, [cfg.vocab_size], 5, greedy))


def test_sampling_is_reproducible_by_seed():
    cfg = ModelConfig(**CASES["qwen3-gqa4"])
    model = Model(cfg, seed=5)
    model.params[:] *= 4
    model.weights_changed()
    dec = Decoder(model)

    def run(seed, **kw):
        return list(generate(model, [3, 4], 15, SamplingConfig(temperature=1.0, seed=seed, **kw),
                             decoder=dec))

    a, b, c = run(11), run(11), run(12)
    assert a == b and a != c
    assert run(11, top_k=1) == list(generate(model, [3, 4], 15, SamplingConfig(temperature=0)))


# -- the distribution ----------------------------------------------------------------------
LOGITS = np.log(np.array([0.05, 0.4, 0.1, 0.3, 0.15]))


def test_temperature_scales_the_softmax():
    p = next_token_probs(LOGITS, 1.0)
    np.testing.assert_allclose(p, [0.05, 0.4, 0.1, 0.3, 0.15])
    hot = next_token_probs(LOGITS, 2.0)
    ref = np.sqrt([0.05, 0.4, 0.1, 0.3, 0.15])
    np.testing.assert_allclose(hot, ref / ref.sum())
    np.testing.assert_array_equal(next_token_probs(LOGITS, 0.0), [0, 1, 0, 0, 0])


def test_top_k_keeps_the_k_most_likely():
    p = next_token_probs(LOGITS, 1.0, top_k=2)
    np.testing.assert_allclose(p, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0])
    np.testing.assert_allclose(next_token_probs(LOGITS, 1.0, top_k=5),
                               next_token_probs(LOGITS, 1.0))


@pytest.mark.parametrize("top_p,kept", [(0.39, [1]), (0.41, [1, 3]), (0.69, [1, 3]),
                                        (0.72, [1, 3, 4]), (0.9, [1, 3, 4, 2]),
                                        (0.96, [1, 3, 4, 2, 0])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    p = next_token_probs(LOGITS, 1.0, top_p=top_p)
    base = np.array([0.05, 0.4, 0.1, 0.3, 0.15])
    ref = np.zeros(5)
    ref[kept] = base[kept] / base[kept].sum()
    np.testing.assert_allclose(p, ref, atol=1e-12)


def test_top_k_then_top_p():
    p = next_token_probs(LOGITS, 1.0, top_k=3, top_p=0.6)
    # top 3: 0.4, 0.3, 0.15 -> renormalised 0.47, 0.35, 0.18; 0.6 needs the first two
    np.testing.assert_allclose(p, [0, 0.4 / 0.7, 0, 0.3 / 0.7, 0])


def reference_probs(logits, temperature, top_k, top_p):
    """The definition, by a full sort: softmax(z / T) over the top_k, then the shortest
    prefix of the sorted rest whose mass reaches top_p."""
    z = np.asarray(logits, np.float64) / temperature
    order = np.lexsort((np.arange(z.size), -z))[:top_k or z.size]
    p = np.exp(z[order] - z[order].max())
    p /= p.sum()
    n = next((i + 1 for i in range(p.size) if p[:i + 1].sum() >= top_p), p.size)
    out = np.zeros(z.size)
    out[order[:n]] = p[:n] / p[:n].sum()
    return out


@pytest.mark.parametrize("seed", range(6))
def test_distribution_equals_its_definition_on_random_logits(seed):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(3000) * rng.choice([0.1, 1.0, 5.0])
    for temperature, top_k, top_p in [(1.0, 0, 0.9), (0.7, 0, 0.5), (1.3, 50, 0.95),
                                      (1.0, 10, 1.0), (2.0, 0, 0.01), (1.0, 1, 0.3),
                                      (0.5, 0, 0.999)]:
        got = next_token_probs(logits, temperature, top_k, top_p)
        ref = reference_probs(logits, temperature, top_k, top_p)
        np.testing.assert_allclose(got, ref, atol=1e-12)
        np.testing.assert_array_equal(got > 0, ref > 0)


def test_draws_follow_the_distribution():
    rng = np.random.Generator(np.random.PCG64(0))
    cfg = SamplingConfig(temperature=1.0, top_k=4, top_p=0.85)
    draws = np.bincount([sample(LOGITS, cfg, rng) for _ in range(20000)], minlength=5) / 20000
    ref = next_token_probs(LOGITS, 1.0, top_k=4, top_p=0.85)
    assert draws[0] == 0 and draws[2] == 0   # cut by top-k and by top-p
    np.testing.assert_allclose(draws, ref, atol=0.015)


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"temperature": float("nan")},
                                 {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2},
                                 {"top_k": 1.5}])
def test_bad_sampling_settings(bad):
    with pytest.raises(ConfigError):
        SamplingConfig(**bad)


# -- the sample command --------------------------------------------------------------------
DATA = Path(__file__).resolve().parent / "data"


def run_sample(args, capsys):
    code = anecy_main(["sample", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# tests/data/llama2c_tied_v0.run_c*.txt are the standard output of llama2.c's run.c (compiled
# with `gcc -O2 -o run run.c -lm` from karpathy/llama2.c, unmodified), recorded once:
#   ./run tests/data/llama2c_tied_v0.bin -z tokenizer.bin -t 0 -n 0  > llama2c_tied_v0.run_c.txt
#   ./run tests/data/llama2c_tied_v0.bin -z tokenizer.bin -t 0 -n 10 > ..._run_c_n10.txt
# with Llama 2's tokenizer.bin (run.c reads its first vocab_size = 512 pieces). No prompt:
# run.c puts the dummy-prefix piece (id 29871) before any prompt text, which a vocabulary of
# 512 lacks. -n 0 runs to the context's end (32 positions) and stops at BOS (here after 16
# tokens); -n 10 stops after 10.
@pytest.mark.parametrize("n,recording", [(100, "llama2c_tied_v0.run_c.txt"),
                                         (10, "llama2c_tied_v0.run_c_n10.txt")])
@pytest.mark.parametrize("tokenizer", ["tokenizer.bin", "tokenizer.model"])
def test_greedy_sample_prints_what_run_c_prints(capsys, n, recording, tokenizer):
    tok = require_shared("data", "llama2-tokenizer", tokenizer,
                         why="decodes the sample of the llama2.c fixture")
    code, out, err = run_sample(["--init-from", DATA / "llama2c_tied_v0.bin", "--tokenizer", tok,
                             "--temperature", 0, "--max-new-tokens", n], capsys)
    assert code == 0, err
    assert out == (DATA / recording).read_text()
    assert "tokens/s" in err


def trained_checkpoint(tmp_path, steps=20):
    from anecy import TrainConfig, Trainer
    tc = TrainConfig(steps=steps, accum=1, lr=3e-3, warmup=0, ckpt_path=str(tmp_path / "t.ckpt"))
    trainer = Trainer(ModelConfig.preset("tiny"), tc, log=lambda *a: None)
    trainer.run(progress=False)
    return trainer


def test_sample_from_a_checkpoint_of_the_builtin_corpus(tmp_path, capsys):
    trainer = trained_checkpoint(tmp_path)
    assert not trainer.vocab.is_identity   # compacted: the checkpoint still holds every row
    capsys.readouterr()
    code, out, err = run_sample(["--ckpt", tmp_path / "t.ckpt", "--temperature", 0,
                             "--max-new-tokens", 20], capsys)
    assert code == 0, err
    # the checkpoint's weights over the active vocabulary: the ids generate() picks
    model = Model(trainer.mc)
    model.params[:] = trainer.model.params
    model.set_active_vocab(trainer.vocab.active_ids)   # only the tokens it was trained on
    ids = list(generate(model, [1], 20, SamplingConfig(temperature=0), stop_ids=[1, 2]))
    assert set(ids) <= set(trainer.vocab.active_ids.tolist())
    from anecy.tokenizer import builtin
    assert len(ids) == 20 and out == builtin().decode([1] + ids) + "\n"
    # a prompt needs a tokenizer that encodes: the built-in decoder cannot
    code, _, err = run_sample(["--ckpt", tmp_path / "t.ckpt", "--prompt", "Once"], capsys)
    assert code == 2 and "tokenizer" in err


def test_sampling_is_reproducible_from_the_command(capsys):
    args = ["--init-from", DATA / "llama2c_tied_v0.bin", "--tokenizer",
            require_shared("data", "llama2-tokenizer", "tokenizer.bin", why="decodes"),
            "--temperature", 1.0, "--top-p", 0.95, "--max-new-tokens", 30]
    a = run_sample(args + ["--seed", 1], capsys)[1]
    b = run_sample(args + ["--seed", 1], capsys)[1]
    c = run_sample(args + ["--seed", 2], capsys)[1]
    assert a == b and a != c


def test_sample_from_an_hf_directory_equals_hf_generate(tmp_path, capsys):
    spm = require_shared("data", "llama2-tokenizer", "tokenizer.model",
                         why="encodes the prompt and decodes the sample")
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(3)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        tie_word_embeddings=True)).float().eval()
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.mul_(20)
    hf.save_pretrained(tmp_path)
    from anecy.tokenizer import load
    tok = load(spm)
    prompt = tok.encode("Once upon a time", bos=True)
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12,
                          pad_token_id=0)[0].tolist()
    ref = ref[:len(prompt) + next((i for i, t in enumerate(ref[len(prompt):]) if t in (1, 2)),
                                  12)]
    code, out, err = run_sample(["--init-from", tmp_path, "--tokenizer", spm, "--prompt",
                             "Once upon a time", "--temperature", 0, "--max-new-tokens", 12],
                            capsys)
    assert code == 0, err
    assert out == tok.decode(ref) + "\n"
    for threads in (1, 2):   # the text does not depend on the decoder's threads
        code, again, err = run_sample(["--init-from", tmp_path, "--tokenizer", spm, "--prompt",
                                       "Once upon a time", "--temperature", 0,
                                       "--max-new-tokens", 12, "--threads", threads], capsys)
        assert code == 0 and again == out, err


@pytest.mark.parametrize("args,words", [
    (["--init-from", DATA / "llama2c_tied_v0.bin"], "no tokenizer"),
    (["--ckpt", DATA / "llama2c_tied_v0.bin"], "not an anecy checkpoint"),
    (["--ckpt", "nowhere.ckpt"], "no such file"),
    (["--init-from", DATA], "no config.json"),
    (["--init-from", DATA / "llama2c_tied_v0.bin", "--top-p", 0], "top_p"),
    (["--init-from", DATA / "llama2c_tied_v0.bin", "--temperature", -1], "temperature"),
])
def test_sample_errors_are_one_line(capsys, args, words):
    code, _, err = run_sample(args, capsys)
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("command", ["sample", "chat"])
def test_threads_must_be_positive(capsys, command):
    with pytest.raises(SystemExit) as stop:
        anecy_main([command, "--init-from", str(DATA / "llama2c_tied_v0.bin"), "--threads", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--threads" in err and len(err.strip().splitlines()) == 1


def test_stream_text_shows_each_piece_once():
    pieces = {1: b"", 5: b" a", 6: b"\xc3", 7: b"\xa9", 8: b"b"}   # 6 + 7: UTF-8 of e-acute

    def decode(ids):   # a byte-level decoder, dropping the first leading space
        return b"".join(pieces[i] for i in ids).decode("utf-8", "replace").removeprefix(" ")
    out = list(stream_text(decode, [1, 5], iter([6, 7, 8, 5])))
    assert out == ["a", "\u00e9", "b", " a"]
    assert "".join(out) == decode([1, 5, 6, 7, 8, 5])


# -- samples while training ----------------------------------------------------------------
def test_sample_every_prints_decoded_samples_outside_the_timed_step(monkeypatch):
    from anecy import TrainConfig, Trainer
    from anecy.generate import training_sample
    from anecy.tokenizer import builtin
    lines = []
    tc = TrainConfig(steps=4, accum=1, sample_every=2)
    trainer = Trainer(ModelConfig.preset("tiny"), tc, log=lines.append)
    records = [trainer.step() for _ in range(2)]
    text = trainer.sample()
    # the built-in corpus decodes with its own pieces: greedy ids from BOS, as text
    model = trainer.model
    ids = list(generate(model, [1], 48, SamplingConfig(temperature=0), [1, 2]))
    assert text == (repr(builtin().decode([1] + ids)) if ids
                    else "'' (the model's first pick ended the text)")
    assert trainer.step_count == 2 and all(r.ms > 0 for r in records)
    # no tokenizer, or one that cannot decode them: the ids, and why (a model this young
    # may end its text at once, so the sampled ids are given here)
    import anecy.generate as g
    monkeypatch.setattr(g, "generate", lambda *a, **k: iter([5, 6, 7]))
    assert training_sample(model, None, 5) == "ids 5 6 7 (pass --tokenizer to read them)"

    class Mismatched:   # e.g. a tokenizer of a smaller vocabulary than the model's
        bos_id, eos_id = 1, 2

        def decode(self, ids):
            raise AnecyError("token id 31999 is outside the vocabulary of 512 tokens")
    out = training_sample(model, Mismatched(), 3)
    assert out.startswith("ids ") and "outside the vocabulary" in out


def test_a_sample_that_ends_at_once_says_so(monkeypatch):
    import anecy.generate as g
    model = Model(ModelConfig.preset("tiny"), backend="cpu", seed=0)
    monkeypatch.setattr(g, "generate", lambda *a, **k: iter(()))
    assert g.training_sample(model, None, 5) == "'' (the model's first pick ended the text)"


def test_sample_every_in_a_run(tmp_path):
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1]
                                               / "train_stories.py"), "--preset", "tiny",
                           "--steps", "4", "--accum", "1", "--sample-every", "2",
                           "--no-progress"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    samples = [line for line in proc.stdout.splitlines() if " sample: " in line]
    assert [s.split()[1] for s in samples] == ["2", "4"]


def test_prepared_data_names_the_tokenizer_for_samples(tmp_path, capsys, monkeypatch):
    spm = require_shared("data", "llama2-tokenizer", "tokenizer.model",
                         why="prepares the token file whose sidecar sampling reads")
    from anecy.corpus import builtin_stories
    monkeypatch.chdir(tmp_path)
    Path("stories.txt").write_text("\n\n".join(builtin_stories(60)))
    assert anecy_main(["prepare", "stories.txt", "--tokenizer", str(spm),
                       "--out", "tokens.bin", "--no-progress"]) == 0
    assert anecy_main(["train", "--preset", "tiny", "--data", "tokens.bin", "--steps", "2",
                       "--accum", "1", "--sample-every", "2", "--ckpt", "t.ckpt",
                       "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "step 2 sample: " in out and "ids " not in out
    # the checkpoint records its data (tokens.bin, relative), whose sidecar names the
    # tokenizer: found from another directory too, beside the checkpoint
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    code, text, err = run_sample(["--ckpt", "../t.ckpt", "--prompt", "Once upon a time",
                                  "--temperature", 0, "--max-new-tokens", 5], capsys)
    assert code == 0, err
    assert text.startswith("Once upon a time")


def test_sample_benchmark_quick():
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "bench/bench_sample.py", "--quick"], cwd=root,
                          capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr
    assert "tokens/s" in proc.stdout
