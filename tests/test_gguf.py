"""anecy export --format gguf: transformers' GGUF loader gives anecy's logits (Llama with each
RoPE convention, Qwen3), f16 and q8_0 stay within their rounding, the gguf package's reader
sees the metadata and the tokenizer written, and bad input is one line."""
import json

import numpy as np
import pytest
import torch

from anecy import Model, ModelConfig, TrainConfig, Trainer
from anecy import tokenizer as T
from anecy.cli import anecy_main
from anecy.fileio import temp_leftovers
from anecy.gguf_export import save
from anecy.hf import save_pretrained
from conftest import require_module, require_shared

gguf = require_module("gguf", 'pip install "anecy[gguf]"', "writes and reads GGUF files")
transformers = require_module("transformers", 'pip install "anecy[test]"', "the oracle")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf import GGUFReader  # noqa: E402

LLAMA2 = ("data", "llama2-tokenizer")
WHY = "the Llama 2 vocabulary embedded as GGUF's llama tokenizer"
# Qwen2/Qwen3's pre-tokenizer split (tokenizer.json), as the offline test tokenizer uses it
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}")
TEXT = ("Once upon a time, a little fox named Tom found 3 shiny stones by the river. "
        "He said: \"I'll keep them!\"\nThe end.  Numbers 1234 and don't, WON'T.\n")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer in Qwen's layout, trained offline with `tokenizers`:
    tokenizer.json (Split + ByteLevel) and tokenizer_config.json with EOS and a template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    d = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 3, "the cat sat on the mat " * 20], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "chat_template": TEMPLATE}))
    return d


def model_for(preset_or_fields, seed=0, scale=0.15, **fields):
    """A Model whose random weights are large enough (std ``scale``) for attention to matter,
    so that a q/k row in the wrong order changes the logits."""
    cfg = (ModelConfig.preset(preset_or_fields, **fields) if isinstance(preset_or_fields, str)
           else ModelConfig(**{**preset_or_fields, **fields}))
    m = Model(cfg, seed=seed)
    rng = np.random.default_rng(seed)
    m.params[:m.n_decay] = rng.standard_normal(m.n_decay).astype(np.float32) * scale
    m.params[m.n_decay:] = 1 + 0.2 * rng.standard_normal(m.params.size - m.n_decay)
    m.weights_changed()
    return m


# vocab 416: the BPE tokenizer's ~350 tokens and unused rows; rows of 64, 128: whole q8_0
# blocks. Qwen3's head_dim is 128 because transformers' GGUF loader does not read
# qwen3.attention.key_length and takes Qwen3Config's default head_dim (128).
LLAMA = dict(dim=64, hidden_dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=416,
             seq_len=32, tie_embeddings=False)
QWEN3 = dict(dim=64, hidden_dim=128, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=128,
             vocab_size=416, seq_len=32, qk_norm=True, norm_eps=1e-6, rope_theta=1e6)


def hf_logits(directory, filename, tokens):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename,
                                              dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.from_numpy(np.asarray(tokens, np.int64)[None])).logits[0].numpy()


def tokens_for(cfg, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)


@pytest.mark.parametrize("arch,fields", [("llama", LLAMA), ("qwen3", QWEN3)])
@pytest.mark.parametrize("rope_style", ["interleaved", "half"])
def test_transformers_reads_anecys_logits(tmp_path, bpe_dir, arch, fields, rope_style):
    model = model_for(fields, rope_style=rope_style)
    path = save(model, tmp_path / "m.gguf", T.load(bpe_dir))
    assert GGUFReader(path).fields["general.architecture"].contents() == arch
    x = tokens_for(model.config)
    ours = model.logits(x)
    theirs = hf_logits(tmp_path, "m.gguf", x)
    assert np.abs(ours).max() > 1.0
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-5 * np.abs(ours).max())


def test_a_wrong_row_order_would_be_seen(tmp_path, bpe_dir):
    """The logits test can fail: the same weights with q/k rows left in HF's order (what
    writing a half-style model's views unchanged as llama would give) do not match."""
    model = model_for(LLAMA, rope_style="half")
    wrong = model_for(LLAMA, rope_style="interleaved")
    wrong.params[:] = model.params   # same numbers, read in the other row order
    wrong.weights_changed()
    save(wrong, tmp_path / "m.gguf", T.load(bpe_dir))
    x = tokens_for(model.config)
    ours = model.logits(x)
    assert np.abs(hf_logits(tmp_path, "m.gguf", x) - ours).max() > 1e-2 * np.abs(ours).max()


def test_qwen3_tensors_as_llama_cpp_reads_them(tmp_path, bpe_dir):
    """For a head_dim transformers' loader cannot take (32, not 128), the file is read back with
    gguf's own reader: qwen3 (NEOX RoPE) holds HF's rows, key_length is the head size."""
    model = model_for("qwen3-tiny", vocab_size=416, rope_style="interleaved")
    path = save(model, tmp_path / "q.gguf", T.load(bpe_dir))
    r = GGUFReader(path)
    assert r.fields["qwen3.attention.key_length"].contents() == 32
    assert r.fields["qwen3.attention.value_length"].contents() == 32
    tensors = {t.name: t for t in r.tensors}
    hf = model.hf_state_dict()
    names = {"blk.1.attn_q.weight": "model.layers.1.self_attn.q_proj.weight",
             "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight",
             "blk.1.attn_q_norm.weight": "model.layers.1.self_attn.q_norm.weight",
             "blk.1.attn_k_norm.weight": "model.layers.1.self_attn.k_norm.weight",
             "token_embd.weight": "model.embed_tokens.weight"}
    for ours, theirs in names.items():
        np.testing.assert_array_equal(np.asarray(tensors[ours].data).reshape(hf[theirs].shape),
                                      hf[theirs])
    assert "output.weight" not in tensors   # tied: llama.cpp reads token_embd


def test_llama_rows_are_llama_cpp_permuted(tmp_path, bpe_dir):
    """llama: q/k rows in llama.cpp's converter order, HF's rows permuted head by head, pairs
    (i, i + head_dim/2) brought together."""
    model = model_for(LLAMA, rope_style="half")
    r = GGUFReader(save(model, tmp_path / "m.gguf", T.load(bpe_dir)))
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    hf = model.hf_state_dict()
    for name, heads in (("q", 4), ("k", 2)):
        w = hf[f"model.layers.0.self_attn.{name}_proj.weight"]
        permuted = w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(tensors[f"blk.0.attn_{name}.weight"], permuted)


@pytest.mark.parametrize("dtype,qtype", [("f16", Q.F16), ("q8_0", Q.Q8_0)])
def test_f16_and_q8_0_within_their_rounding(tmp_path, bpe_dir, dtype, qtype):
    # interleaved: llama's tensors are the Model's views row for row, so the dequantized
    # weights go straight back into a Model
    model = model_for(LLAMA, rope_style="interleaved")
    r = GGUFReader(save(model, tmp_path / "m.gguf", T.load(bpe_dir), dtype=dtype))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.n_layers)
    hf_name = {names.get_name(n, try_suffixes=(".weight",)): n for n in model.views}
    rounded = model_for(LLAMA, rope_style="interleaved")
    for t in r.tensors:
        w = model.views[hf_name[t.name]]
        back = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.shape)
        rounded.views[hf_name[t.name]][...] = back
        if w.ndim == 1:   # norm weights stay exact
            assert t.tensor_type == Q.F32
            np.testing.assert_array_equal(back, w)
            continue
        assert t.tensor_type == qtype
        if dtype == "f16":   # round to nearest: half an ulp of 11 significant bits
            assert np.all(np.abs(back - w) <= np.abs(w) * 2.0 ** -11 + 2.0 ** -25)
        else:
            # q8_0: blocks of 32 values, d = max|w| / 127 (stored as f16), q = round(w / d):
            # error at most d / 2 plus the f16 rounding of d times |q| <= 127
            blocks = w.reshape(-1, 32)
            amax = np.abs(blocks).max(axis=1, keepdims=True)
            bound = amax / 127 * (0.5 + 127 * 2.0 ** -11) + 1e-7
            assert np.all(np.abs(back.reshape(-1, 32) - blocks) <= bound)
    rounded.weights_changed()
    # transformers runs the file as the rounded weights, exactly as f32 runs the f32 weights
    x = tokens_for(model.config)
    theirs, ours = hf_logits(tmp_path, "m.gguf", x), rounded.logits(x)
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=2e-5 * np.abs(ours).max())
    # and the rounding moves this model's logits (weights of std 0.15, far above a trained
    # model's 0.02, so every error is amplified) by at most (measured 0.03% for f16, 3% for
    # q8_0)
    exact = model.logits(x)
    err = np.abs(theirs - exact).max() / np.abs(exact).max()
    assert err < {"f16": 2e-3, "q8_0": 6e-2}[dtype], err


def test_q8_0_is_about_a_quarter_of_f32(tmp_path, bpe_dir):
    model = model_for(LLAMA, dim=128, hidden_dim=256, n_heads=4, vocab_size=2048)
    tok = T.load(bpe_dir)
    f32 = save(model, tmp_path / "f32.gguf", tok).stat().st_size
    q8 = save(model, tmp_path / "q8.gguf", tok, dtype="q8_0").stat().st_size
    f16 = save(model, tmp_path / "f16.gguf", tok, dtype="f16").stat().st_size
    assert 0.25 <= q8 / f32 <= 0.32, q8 / f32
    assert 0.5 <= f16 / f32 <= 0.56, f16 / f32


def test_metadata_as_the_gguf_reader_sees_it(tmp_path, bpe_dir):
    model = model_for(QWEN3)
    tok = T.load(bpe_dir)
    r = GGUFReader(save(model, tmp_path / "m.gguf", tok, context_length=4096, name="tiny"))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "qwen3" and f["general.name"] == "tiny"
    assert f["qwen3.context_length"] == 4096
    assert f["qwen3.embedding_length"] == 64
    assert f["qwen3.feed_forward_length"] == 128
    assert f["qwen3.block_count"] == 2
    assert f["qwen3.attention.head_count"] == 2
    assert f["qwen3.attention.head_count_kv"] == 1
    assert f["qwen3.attention.key_length"] == 128
    assert f["qwen3.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    assert f["qwen3.rope.freq_base"] == 1e6
    assert f["qwen3.vocab_size"] == 416
    assert f["tokenizer.ggml.model"] == "gpt2"
    assert f["tokenizer.ggml.pre"] == "qwen2"
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_id == 2
    assert "tokenizer.ggml.bos_token_id" not in f          # Qwen has no BOS
    assert f["tokenizer.ggml.padding_token_id"] == 0
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.chat_template"] == TEMPLATE
    assert len(f["tokenizer.ggml.tokens"]) == 416


def test_gpt2_tokenizer_round_trips(tmp_path, bpe_dir):
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    model = model_for(QWEN3)
    r = GGUFReader(save(model, tmp_path / "m.gguf", T.load(bpe_dir)))
    f = {k: v.contents() for k, v in r.fields.items()}
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    n = tok.get_vocab_size()
    assert 320 < n < 416   # the model has unused rows past the tokenizer's tokens
    assert tokens[:n] == [tok.id_to_token(i) for i in range(n)]
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 416)]
    assert set(types[n:]) == {gguf.TokenType.UNUSED}
    assert [types[tok.token_to_id(s)] for s in SPECIALS] == [gguf.TokenType.CONTROL] * 3
    assert set(types[3:n]) == {gguf.TokenType.NORMAL}
    spec = json.loads((bpe_dir / "tokenizer.json").read_text())
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert f["tokenizer.ggml.merges"] == merges and len(merges) > 50
    # transformers' own GGUF tokenizer converter rebuilds a tokenizer that encodes alike
    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert theirs.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT).ids


@pytest.mark.parametrize("source", ["tokenizer.model", "tokenizer.bin"])
def test_llama_tokenizer_round_trips(tmp_path, source):
    spm = require_module("sentencepiece", 'pip install "anecy[data]"', "the reference")
    sp = spm.SentencePieceProcessor(model_file=str(require_shared(*LLAMA2, "tokenizer.model",
                                                                  why=WHY)))
    tok = T.load(require_shared(*LLAMA2, source, why=WHY))
    model = model_for("tiny")
    r = GGUFReader(save(model, tmp_path / "m.gguf", tok))
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["tokenizer.ggml.model"] == "llama"
    assert f["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(32000)]
    np.testing.assert_array_equal(np.float32(f["tokenizer.ggml.scores"]),
                                  np.float32([sp.get_score(i) for i in range(32000)]))
    types = f["tokenizer.ggml.token_type"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1:3] == [gguf.TokenType.CONTROL] * 2
    assert types[3:259] == [gguf.TokenType.BYTE] * 256
    assert set(types[259:]) == {gguf.TokenType.NORMAL}
    assert (f["tokenizer.ggml.bos_token_id"], f["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert f["tokenizer.ggml.unknown_token_id"] == 0
    assert f["tokenizer.ggml.add_bos_token"] is True
    assert "tokenizer.chat_template" not in f


def test_llama_tokenizer_encodes_as_sentencepiece_in_transformers(tmp_path):
    spm = require_module("sentencepiece", 'pip install "anecy[data]"', "the reference")
    path = require_shared(*LLAMA2, "tokenizer.model", why=WHY)
    save(model_for("tiny"), tmp_path / "m.gguf", T.load(path))
    from transformers import AutoTokenizer
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert theirs.encode(TEXT) == [1] + sp.encode(TEXT)


# -- the command ----------------------------------------------------------------------------
def export(args, capsys):
    try:
        code = anecy_main(["export", *map(str, args)])
    except SystemExit as e:   # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_export_of_an_hf_directory_takes_its_tokenizer(tmp_path, capsys, bpe_dir):
    model = model_for(QWEN3)
    save_pretrained(model, tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / name).write_bytes((bpe_dir / name).read_bytes())
    # as Qwen3's: no BOS in the tokenizer, <|endoftext|> named in config.json
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "bos_token_id": 0}))
    out = tmp_path / "model.gguf"
    code, stdout, err = export(["--init-from", tmp_path / "hf", "--format", "gguf", "--out", out,
                                "--dtype", "q8_0"], capsys)
    assert code == 0, err
    assert "wrote" in stdout and not temp_leftovers(out)
    r = GGUFReader(out)
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f["qwen3.context_length"] == 2048   # the HF config's max_position_embeddings
    assert f["tokenizer.chat_template"] == TEMPLATE
    assert f["tokenizer.ggml.bos_token_id"] == 0 and f["tokenizer.ggml.add_bos_token"] is False


def test_a_checkpoint_without_tokenizer_is_refused_naming_the_flag(tmp_path, capsys):
    ckpt = tmp_path / "t.ckpt"
    Trainer(ModelConfig.preset("tiny"), TrainConfig(steps=1, accum=1, ckpt_path=str(ckpt)),
            log=lambda *a: None).run(progress=False)
    out = tmp_path / "m.gguf"
    code, _, err = export(["--ckpt", ckpt, "--format", "gguf", "--out", out], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--tokenizer" in err
    assert not out.exists() and not temp_leftovers(out)
    tok = require_shared(*LLAMA2, "tokenizer.model", why=WHY)
    code, _, err = export(["--ckpt", ckpt, "--format", "gguf", "--out", out, "--tokenizer", tok],
                          capsys)
    assert code == 0, err
    assert GGUFReader(out).fields["llama.context_length"].contents() == 64


@pytest.mark.parametrize("args,says", [
    (["--dtype", "q4"], "invalid choice"),
    (["--tokenizer", "{bpe}"], "more than the model's vocabulary"),  # ~350 tokens > 320 rows
    (["--tokenizer", "{missing}"], "no such tokenizer"),
])
def test_bad_input_is_one_line(tmp_path, capsys, bpe_dir, args, says):
    model = model_for(LLAMA, vocab_size=320)
    save_pretrained(model, tmp_path / "hf")
    args = [a.format(bpe=bpe_dir, missing=tmp_path / "nope.model") for a in args]
    out = tmp_path / "m.gguf"
    code, _, err = export(["--init-from", tmp_path / "hf", "--format", "gguf", "--out", out,
                           *args], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and says in err, err
    assert not out.exists()


def test_dtype_belongs_to_gguf(tmp_path, capsys):
    model = model_for(LLAMA)
    save_pretrained(model, tmp_path / "hf")
    code, _, err = export(["--init-from", tmp_path / "hf", "--format", "llama2c", "--out",
                           tmp_path / "m.bin", "--dtype", "f16"], capsys)
    assert code == 2 and "--format gguf" in err and len(err.strip().splitlines()) == 1


def test_a_failed_write_leaves_the_old_file(tmp_path, capsys, monkeypatch, bpe_dir):
    """A disk that fills up in the middle of the tensors: one line, the file that was there
    before is untouched and no temporary is left."""
    import errno
    model = model_for(LLAMA)
    save_pretrained(model, tmp_path / "hf")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"the old file")
    written = []

    def write_tensor_data(self, tensor, *args, **kwargs):
        if written:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(tensor)
        return original(self, tensor, *args, **kwargs)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", write_tensor_data)
    code, _, err = export(["--init-from", tmp_path / "hf", "--format", "gguf", "--out", out,
                           "--tokenizer", bpe_dir], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "No space left on device" in err
    assert out.read_bytes() == b"the old file" and not temp_leftovers(out)


def test_tokenizers_and_models_gguf_cannot_hold(tmp_path, bpe_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from anecy.errors import AnecyError, ConfigError
    word = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word.pre_tokenizer = pre_tokenizers.Whitespace()
    word.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(AnecyError, match="a WordLevel tokenizer"):
        save(model_for(LLAMA), tmp_path / "m.gguf", T.load(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match="residual_scale"):
        save(model_for(LLAMA, residual_scale=0.5), tmp_path / "m.gguf", T.load(bpe_dir))
    assert not (tmp_path / "m.gguf").exists()


def test_a_malformed_config_beside_the_tokenizer_is_one_error(tmp_path, bpe_dir):
    from anecy.errors import AnecyError
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((bpe_dir / name).read_bytes())
    (tmp_path / "config.json").write_text('{"bos_token_id": 0, "eos_tok')   # cut short
    with pytest.raises(AnecyError, match="config.json"):
        save(model_for(QWEN3), tmp_path / "m.gguf", T.load(tmp_path / "tokenizer.json"))
    assert not (tmp_path / "m.gguf").exists()


def test_adapters_are_fused_into_the_gguf_file_and_eval(tmp_path, capsys, bpe_dir):
    """--adapter DIR: the GGUF file holds base + adapters, as lora.fuse makes them, and
    `anecy eval --adapter` scores that fused model."""
    from anecy.lora import LoraAdapters, LoraConfig, fuse, save_peft
    model = model_for(LLAMA, rope_style="half")
    save_pretrained(model, tmp_path / "hf")
    adapters = LoraAdapters(model.config, LoraConfig(rank=4), seed=3)
    rng = np.random.default_rng(3)
    for t in adapters.layout:
        if t.part == "B":   # PEFT starts B at zero; non-zero so that fusing changes the model
            adapters.views[t.name][...] = rng.standard_normal(t.shape) * 0.2
    save_peft(tmp_path / "adapter", adapters, str(tmp_path / "hf"))
    out = tmp_path / "m.gguf"
    code, stdout, err = export(["--init-from", tmp_path / "hf", "--adapter", tmp_path / "adapter",
                                "--format", "gguf", "--out", out, "--tokenizer", bpe_dir], capsys)
    assert code == 0, err
    assert "fused" in stdout
    fused = fuse(model, adapters)
    x = tokens_for(model.config)
    ours = fused.logits(x)
    assert np.abs(model.logits(x) - ours).max() > 1e-2 * np.abs(ours).max()
    np.testing.assert_allclose(hf_logits(tmp_path, "m.gguf", x), ours, rtol=0,
                               atol=2e-5 * np.abs(ours).max())
    # eval of base + adapter is eval of the fused model
    data = tmp_path / "val.bin"
    np.random.default_rng(5).integers(0, 416, 3 * 32 + 1).astype("<u2").tofile(data)
    assert anecy_main(["eval", "--init-from", str(tmp_path / "hf"), "--adapter",
                       str(tmp_path / "adapter"), "--data", str(data), "--json",
                       "--seq-len", "32"]) == 0
    ours = json.loads(capsys.readouterr().out)
    save_pretrained(fused, tmp_path / "fused")
    assert anecy_main(["eval", "--init-from", str(tmp_path / "fused"), "--data", str(data),
                       "--json", "--seq-len", "32"]) == 0
    theirs = json.loads(capsys.readouterr().out)
    assert ours["windows"] == theirs["windows"] == 3
    assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-6)
