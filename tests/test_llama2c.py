"""llama2.c checkpoints: files written by llama2.c's own exporter, round trips, bad files.

The fixtures in tests/data were made once with karpathy/llama2.c's `model.py` and `export.py`
(outside this repository): a `Transformer(ModelArgs(dim=16, n_layers=2, n_heads=4,
n_kv_heads=2, hidden_dim=40, max_seq_len=32))` after `torch.manual_seed(seed)`, its matrices
scaled by 25 and its norm weights moved by N(0, 0.3) (so that greedy text varies), written by
`legacy_export` (version 0) and `version1_export` (version 1):

- llama2c_tied_v0.bin: vocab 512 (a prefix of Llama 2's vocabulary), classifier tied to the
  embedding, seed 12; the embedding rows of EOS and the 256 byte tokens (ids 2..258) scaled
  by 0.05 so that greedy text holds no byte tokens (run.c prints bytes its own way)
- llama2c_untied_v0.bin / llama2c_untied_v1.bin: vocab 96, seed 1, a separate N(0, 0.3)
  classifier

llama2c_*_logits.npy hold `model.py`'s logits `Transformer(tokens, targets=tokens)` at every
position of TOKENS (modulo the vocabulary), in float32. tests/test_generate.py describes the
run.c recordings.
"""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from anecy import CheckpointError, ConfigError, Model, ModelConfig, llama2c
from anecy.hf import save_pretrained

DATA = Path(__file__).resolve().parent / "data"
TOKENS = [1, 450, 29871, 7, 300, 11, 42, 3, 260, 95, 17, 88, 400, 2, 64, 90]
FIXTURES = [("llama2c_tied_v0.bin", "llama2c_tied_logits.npy", 0, True),
            ("llama2c_untied_v0.bin", "llama2c_untied_logits.npy", 0, False),
            ("llama2c_untied_v1.bin", "llama2c_untied_logits.npy", 1, False)]


def tokens_for(model):
    return (np.array(TOKENS) % model.config.vocab_size).astype(np.int32)


@pytest.mark.parametrize("name,logits,version,tied", FIXTURES)
def test_files_from_llama2c_export_give_its_model_py_logits(name, logits, version, tied):
    cfg, got_version = llama2c.read_config(DATA / name)
    assert got_version == version and cfg.tie_embeddings == tied
    assert (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.seq_len) \
        == (16, 40, 2, 4, 2, 32)
    assert cfg.rope_style == "interleaved" and cfg.norm_eps == 1e-5
    model = llama2c.load(DATA / name, seq_len=len(TOKENS))
    ref = np.load(DATA / logits)
    out = model.logits(tokens_for(model))
    assert out.shape == ref.shape
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_context_length_comes_from_the_header():
    assert llama2c.load(DATA / "llama2c_tied_v0.bin").config.seq_len == 32


@pytest.mark.parametrize("name,logits,version,tied", FIXTURES)
def test_save_writes_the_bytes_llama2c_writes(tmp_path, name, logits, version, tied):
    model = llama2c.load(DATA / name)
    out = llama2c.save(model, tmp_path / "out.bin", version=version)
    ours, theirs = out.read_bytes(), (DATA / name).read_bytes()
    assert len(ours) == len(theirs)
    if version == 1:
        assert ours == theirs
        return
    # version 0 also holds two RoPE tables that readers skip; torch's cos/sin and numpy's may
    # differ in the last bit, everything else is byte for byte llama2.c's
    cfg = model.config
    n_rope = 2 * cfg.seq_len * cfg.head_dim // 2
    start = 28 + 4 * (cfg.vocab_size * cfg.dim + cfg.n_layers * (
        2 * cfg.dim + 2 * cfg.dim * cfg.dim + 2 * cfg.kv_dim * cfg.dim
        + 3 * cfg.dim * cfg.hidden_dim) + cfg.dim)
    end = start + 4 * n_rope
    assert ours[:start] == theirs[:start] and ours[end:] == theirs[end:]
    np.testing.assert_allclose(np.frombuffer(ours[start:end], "<f4"),
                               np.frombuffer(theirs[start:end], "<f4"), atol=1e-6)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_keeps_every_weight(tmp_path, version, tied):
    cfg = ModelConfig(dim=24, hidden_dim=40, n_layers=3, n_heads=6, n_kv_heads=2,
                      vocab_size=70, seq_len=20, tie_embeddings=tied)
    model = Model(cfg, seed=3)
    llama2c.save(model, tmp_path / "m.bin", version=version)
    again = llama2c.load(tmp_path / "m.bin")
    assert again.config == cfg
    np.testing.assert_array_equal(again.params, model.params)


def test_export_of_an_hf_model_gives_transformers_logits(tmp_path):
    # a half-split (HF) Llama written as llama2.c (interleaved rows), read back, then
    # written as HF again: transformers' logits are anecy's at every step
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
        max_position_embeddings=32, tie_word_embeddings=False)).float().eval()
    hf.save_pretrained(tmp_path / "hf")
    from anecy.hf import load_pretrained
    half = load_pretrained(tmp_path / "hf", seq_len=12)
    llama2c.save(half, tmp_path / "m.bin")
    ours = llama2c.load(tmp_path / "m.bin", seq_len=12)
    assert ours.config.rope_style == "interleaved"
    tokens = (np.arange(12) * 7 % 64).astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.from_numpy(tokens[None].astype(np.int64))).logits[0].numpy()
    assert np.abs(ours.logits(tokens) - ref).max() <= 1e-5 * np.abs(ref).max()
    save_pretrained(ours, tmp_path / "back")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    with torch.no_grad():
        again = back(torch.from_numpy(tokens[None].astype(np.int64))).logits[0].numpy()
    assert np.abs(again - ref).max() <= 1e-5 * np.abs(ref).max()


def test_fixture_through_hf_gives_llama2c_logits(tmp_path):
    model = llama2c.load(DATA / "llama2c_untied_v1.bin", seq_len=len(TOKENS))
    save_pretrained(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    with torch.no_grad():
        out = hf(torch.from_numpy(tokens_for(model)[None].astype(np.int64))).logits[0].numpy()
    ref = np.load(DATA / "llama2c_untied_logits.npy")
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()


def test_models_the_format_cannot_hold_are_refused(tmp_path):
    qwen = Model(ModelConfig.preset("qwen3-tiny", vocab_size=50))
    with pytest.raises(ConfigError, match="QK-norm"):
        llama2c.save(qwen, tmp_path / "q.bin")
    eps = Model(ModelConfig(dim=16, hidden_dim=32, n_layers=1, n_heads=2, vocab_size=20,
                            seq_len=8, norm_eps=1e-6))
    with pytest.raises(ConfigError, match="norm_eps"):
        llama2c.save(eps, tmp_path / "e.bin")
    with pytest.raises(ConfigError, match="version"):
        llama2c.save(Model(ModelConfig.preset("tiny", vocab_size=20)), tmp_path / "v.bin", 2)
    assert not list(tmp_path.iterdir())


# -- malformed files -----------------------------------------------------------------------
def _bad(tmp_path, data: bytes) -> Path:
    path = tmp_path / "bad.bin"
    path.write_bytes(data)
    return path


def _v1_header(version=1, dims=(16, 40, 2, 4, 2, 96, 32), flag=0):
    h = struct.pack("<Ii7iB", llama2c.MAGIC, version, *dims, flag)
    return h + bytes(256 - len(h))


def _cases():
    good0 = (DATA / "llama2c_untied_v0.bin").read_bytes()
    good1 = (DATA / "llama2c_untied_v1.bin").read_bytes()
    nan = bytearray(good1)
    nan[256 + 40:256 + 44] = struct.pack("<f", float("nan"))
    inf = bytearray(good0)
    inf[28:32] = struct.pack("<f", float("inf"))
    return {
        "empty": (b"", "shorter than a header"),
        "short header": (good0[:20], "shorter than a header"),
        "truncated v0": (good0[:-4], "needs"),
        "junk after v0": (good0 + b"\0" * 4, "needs"),
        "truncated v1": (good1[:-100], "needs"),
        "v1 header cut": (good1[:100], "truncated"),
        "version 2": (_v1_header(2) + good1[256:], "version 2"),
        "version 7": (_v1_header(7) + good1[256:], "version 7"),
        "bad flag": (_v1_header(flag=9) + good1[256:], "flag"),
        "zero dim": (struct.pack("<7i", 0, 40, 2, 4, 2, 96, 32) + good0[28:], "dim = 0"),
        "absurd layers": (struct.pack("<7i", 16, 40, 1 << 30, 4, 2, 96, 32) + good0[28:],
                          "n_layers"),
        "negative seq": (struct.pack("<7i", 16, 40, 2, 4, 2, 96, -5) + good0[28:], "seq_len"),
        "heads do not divide": (struct.pack("<7i", 16, 40, 2, 5, 5, 96, 32) + good0[28:],
                                "do not fit"),
        "text file": (b"hello, this is not a model at all\n" * 4, "not a llama2.c checkpoint"),
        "nan weight": (bytes(nan), "NaN"),
        "inf weight": (bytes(inf), "NaN or infinite"),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_malformed_files_are_one_clear_error(tmp_path, case):
    data, words = _cases()[case]
    path = _bad(tmp_path, data)
    with pytest.raises(CheckpointError, match=words) as e:
        llama2c.load(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        llama2c.load(tmp_path / "nope.bin")
    with pytest.raises(CheckpointError, match="directory"):
        llama2c.load(tmp_path)


def test_load_into_another_shape_is_refused():
    model = Model(ModelConfig(dim=16, hidden_dim=40, n_layers=2, n_heads=4, n_kv_heads=2,
                              vocab_size=96, seq_len=8, tie_embeddings=True))
    with pytest.raises(CheckpointError, match="differs in tie_embeddings"):
        llama2c.load_into(model, DATA / "llama2c_untied_v0.bin")


# -- fine-tuning from a llama2.c file --------------------------------------------------------
def test_train_init_from_a_llama2c_file_takes_its_shape(tmp_path, capsys):
    from anecy.checkpoint import load_checkpoint
    from anecy.cli import anecy_main
    rng = np.random.default_rng(0)
    rng.integers(3, 512, 4000).astype(np.uint16).tofile(tmp_path / "tokens.bin")
    ckpt = tmp_path / "ft.ckpt"
    code = anecy_main(["train", "--init-from", str(DATA / "llama2c_tied_v0.bin"),
                       "--data", str(tmp_path / "tokens.bin"), "--steps", "1", "--lr", "1e-12",
                       "--ckpt", str(ckpt), "--no-progress"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "initial weights" in out
    _, arrays = load_checkpoint(ckpt)
    source = llama2c.load(DATA / "llama2c_tied_v0.bin")
    # one update at lr 1e-12 leaves the file's weights (not a random init) in place
    np.testing.assert_allclose(arrays["params"], source.params, rtol=0, atol=1e-6)
    # the sequence length is the preset's (stories110m: 256), not the file's context (32)
    from anecy.checkpoint import read_checkpoint_meta
    mc = read_checkpoint_meta(ckpt)["meta"]["model_config"]
    assert mc["seq_len"] == 256 and mc["dim"] == 16 and mc["vocab_size"] == 512
    # a --preset of another shape is refused before any work
    code = anecy_main(["train", "--init-from", str(DATA / "llama2c_tied_v0.bin"),
                       "--preset", "tiny", "--ckpt", str(tmp_path / "x.ckpt")])
    _, err = capsys.readouterr()
    assert code == 2 and "another model than --preset tiny" in err and "dim" in err
    assert not (tmp_path / "x.ckpt").exists()


def test_a_refused_file_leaves_the_model_as_it_was(tmp_path):
    good = (DATA / "llama2c_untied_v1.bin").read_bytes()
    bad = bytearray(good)
    bad[-4:] = struct.pack("<f", float("nan"))   # the last classifier weight
    (tmp_path / "nan.bin").write_bytes(bytes(bad))
    model = llama2c.load(DATA / "llama2c_untied_v1.bin")
    model.params[:] *= 2
    model.weights_changed()
    before = model.params.copy()
    with pytest.raises(CheckpointError, match="NaN"):
        llama2c.load_into(model, tmp_path / "nan.bin")
    np.testing.assert_array_equal(model.params, before)
