"""anecy.tokenizer: llama2.c's tokenizer.bin against SentencePiece on the same Llama-2
vocabulary, Hugging Face tokenizer.json files built here, and the built-in corpus."""
import json
import random
import struct
import sys

import pytest

from anecy import tokenizer as T
from anecy.corpus import builtin_stories, builtin_tokens
from anecy.errors import AnecyError
from conftest import require_module, require_shared

WHY = "the Llama-2 tokenizer, to check llama2.c's tokenizer.bin against SentencePiece"

WORDS = ("Once upon a time there was little girl named Lily She liked to play outside "
         "The end I'm don't can't 3.14 2026 e-mail x_y=z+1; {json: [1, 2]} ... ?! \"quoted\" "
         "naïve café Straße Ωmega résumé 東京 你好世界 こんにちは 한국어 Привет مرحبا "
         "🙂 👍🏽 🇫🇷 \u200b \u00a0 <s> </s> <unk> <0x41> <0x0A> ▁ ▁▁x").split(" ")
SEPARATORS = (" ", "  ", "   ", "\n", "\n\n", "\t", " \n ", "\r\n", "", ",", ". ")


def varied_strings(n=400, seed=0):
    """Seeded text: words in many scripts, whitespace runs, byte-fallback characters (rare
    code points), text spelling special pieces, leading and trailing spaces."""
    rng = random.Random(seed)
    out = ["", " ", "  ", "\n", "a", "A", " a", "a ", "<0x41>", "\u2047", "\x00", "\x7f",
           "\U0010ffff", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"]
    while len(out) < n:
        parts = []
        for _ in range(rng.randrange(1, 25)):
            r = rng.random()
            if r < 0.75:
                parts.append(rng.choice(WORDS))
            elif r < 0.9:
                parts.append("".join(chr(rng.randrange(0x20, 0x3000))
                                     for _ in range(rng.randrange(1, 4))))
            else:
                parts.append(chr(rng.choice((rng.randrange(0x1f300, 0x1faff),
                                             rng.randrange(0x10000, 0x2ffff)))))
            parts.append(rng.choice(SEPARATORS))
        s = "".join(parts)
        out.append(s if rng.random() < 0.7 else rng.choice(SEPARATORS) + s)
    return out


@pytest.fixture(scope="module")
def llama2():
    """(SentencePieceProcessor on tokenizer.model, anecy's tokenizer.bin reader)."""
    spm = require_module("sentencepiece", "pip install sentencepiece", WHY)
    model = require_shared("data", "llama2-tokenizer", "tokenizer.model", why=WHY)
    binary = require_shared("data", "llama2-tokenizer", "tokenizer.bin", why=WHY)
    return spm.SentencePieceProcessor(model_file=str(model)), T.load(binary)


def test_llama2c_reader_shape(llama2):
    _, tok = llama2
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("llama2c", 32000, 1, 2)
    assert isinstance(tok, T.Tokenizer)


def test_llama2c_encodes_as_sentencepiece(llama2):
    sp, tok = llama2
    strings = varied_strings()
    assert len(strings) >= 400
    byte_fallback = 0
    for s in strings:
        want = sp.encode(s)
        assert tok.encode(s) == want, repr(s)
        assert tok.encode(s, bos=True, eos=True) == [1] + want + [2]
        byte_fallback += any(3 <= i < 259 for i in want)
    assert byte_fallback > 50  # the strings exercise byte fallback, not only whole pieces


def test_llama2c_decodes_as_sentencepiece(llama2):
    sp, tok = llama2
    for s in varied_strings(seed=1):
        ids = sp.encode(s)
        assert tok.decode(ids) == sp.decode(ids), repr(s)
        assert tok.decode([1] + ids + [2]) == sp.decode([1] + ids + [2]), repr(s)
    rng = random.Random(2)
    for _ in range(500):  # arbitrary id sequences, as a model samples them
        ids = [rng.randrange(32000) for _ in range(rng.randrange(1, 12))]
        assert tok.decode(ids) == sp.decode(ids), ids


def test_sentencepiece_model(llama2):
    sp, _ = llama2
    tok = T.load(require_shared("data", "llama2-tokenizer", "tokenizer.model", why=WHY))
    assert (tok.kind, tok.vocab_size, tok.bos_id, tok.eos_id) == ("sentencepiece", 32000, 1, 2)
    s = "Once upon a time, 你好 🙂"
    assert tok.encode(s, bos=True) == [1] + sp.encode(s)
    assert tok.decode(tok.encode(s)) == s
    with pytest.raises(AnecyError, match="outside the vocabulary"):
        tok.decode([32000])


def test_load_directory_picks_a_tokenizer(tmp_path, llama2):
    binary = require_shared("data", "llama2-tokenizer", "tokenizer.bin", why=WHY)
    (tmp_path / "tokenizer.bin").write_bytes(binary.read_bytes())
    assert T.load(tmp_path).kind == "llama2c"
    # an unknown extension is recognised by content
    (tmp_path / "vocab.dat").write_bytes(binary.read_bytes())
    assert T.load(tmp_path / "vocab.dat").kind == "llama2c"


def _write_bin(path, pieces, max_len=None):
    max_len = max_len or max(len(p) for p, _ in pieces)
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max_len))
        f.writelines(struct.pack("<fi", score, len(p)) + p for p, score in pieces)


def test_llama2c_small_vocab_merges_by_score(tmp_path):
    # a vocabulary written here: merges follow the scores, leftmost first on ties
    pieces = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
    pieces += [(b"<0x%02X>" % b, 0.0) for b in range(256)]
    pieces += [(b" ", -1.0), (b"a", -1.0), (b"b", -1.0), (b"ab", -3.0), (b"ba", -2.0),
               (b" a", -5.0), (b"aba", -4.0)]
    path = tmp_path / "tok.bin"
    _write_bin(path, pieces)
    tok = T.load(path)
    assert tok.vocab_size == 3 + 256 + 7
    ids = {p.decode(): i for i, (p, _) in enumerate(pieces)}
    # " abab": "ba" (-2) first, then "aba" (-4) beats " a" (-5)
    assert tok.encode("abab") == [ids[" "], ids["aba"], ids["b"]]
    assert tok.encode("aa") == [ids[" a"], ids["a"]]
    assert tok.encode("c") == [ids[" "], 3 + ord("c")]          # byte fallback
    assert tok.decode(tok.encode("abab c")) == "abab c"


def test_llama2c_bad_files(tmp_path):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(b"\x01")
    with pytest.raises(AnecyError, match="too short"):
        T.load(path)
    pieces = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0), (b"abc", -1.0)]
    _write_bin(path, pieces)
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(AnecyError, match="token 3 has length 3"):
        T.load(path)
    path.write_bytes(struct.pack("<i", -5) + b"\0" * 20)
    with pytest.raises(AnecyError, match="max_token_length -5"):
        T.load(path)
    with pytest.raises(AnecyError, match="no such tokenizer file"):
        T.load(tmp_path / "missing.model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AnecyError, match="a directory without tokenizer.json"):
        T.load(tmp_path / "empty")


# -- Hugging Face tokenizer.json ----------------------------------------------------------------

def _train_bpe(tmp_path, specials=("<unk>", "<s>", "</s>")):
    """A byte-level BPE trained here on a few sentences, saved as tokenizer.json."""
    tokenizers = require_module("tokenizers", "pip install tokenizers",
                                "building a Hugging Face tokenizer.json in the test")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = [s for s in builtin_stories(200)] + varied_strings(100, seed=5)
    tok.train_from_iterator(text, trainer)
    tmp_path.mkdir(parents=True, exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


def test_hf_tokenizer_json(tmp_path):
    ref = _train_bpe(tmp_path)
    ref.encode_special_tokens = True   # as anecy encodes: "</s>" in the text stays text
    for where in (tmp_path / "tokenizer.json", tmp_path):
        tok = T.load(where)
        assert tok.kind == "hf" and tok.path == str(tmp_path / "tokenizer.json")
        assert tok.vocab_size == ref.get_vocab_size() == 400
        assert (tok.bos_id, tok.eos_id) == (ref.token_to_id("<s>"), ref.token_to_id("</s>"))
        for s in varied_strings(60, seed=3):
            ids = tok.encode(s)
            assert ids == ref.encode(s).ids
            assert tok.decode(ids) == s
            assert tok.encode(s, bos=True, eos=True) == [tok.bos_id] + ids + [tok.eos_id]
            assert tok.decode([tok.bos_id] + ids + [tok.eos_id]) == s
        assert tok.eos_id not in tok.encode("the end</s>")


def test_hf_specials_from_tokenizer_config(tmp_path):
    # Qwen3's layout: no BOS, EOS named in tokenizer_config.json
    ref = _train_bpe(tmp_path, specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))
    tok = T.load(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (None, ref.token_to_id("<|endoftext|>"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": None, "eos_token": {"content": "<|im_end|>"}}))
    tok = T.load(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (None, ref.token_to_id("<|im_end|>"))
    with pytest.raises(AnecyError, match="has no BOS token"):
        tok.encode("hi", bos=True)


def test_hf_bad_json(tmp_path):
    require_module("tokenizers", "pip install tokenizers", "reading tokenizer.json")
    (tmp_path / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    with pytest.raises(AnecyError, match="not a Hugging Face tokenizer.json"):
        T.load(tmp_path)


@pytest.mark.parametrize("module,file", [("tokenizers", "tokenizer.json"),
                                         ("sentencepiece", "tokenizer.model")])
def test_missing_library_names_the_extra(tmp_path, monkeypatch, module, file):
    monkeypatch.setitem(sys.modules, module, None)   # import raises ImportError
    (tmp_path / file).write_bytes(b"{}" if file.endswith("json") else b"\x0a\x00")
    with pytest.raises(AnecyError, match=r'pip install "anecy\[data\]"'):
        T.load(tmp_path / file)


# -- the built-in corpus ------------------------------------------------------------------------

def test_builtin_decodes_the_corpus():
    tok = T.builtin()
    assert (tok.kind, tok.vocab_size, tok.bos_id) == ("builtin", 32000, 1)
    ids = builtin_tokens(20000).tolist()
    starts = [i for i, t in enumerate(ids) if t == 1] + [len(ids)]
    stories = builtin_stories(len(starts) - 1)
    for k in range(len(starts) - 2):     # the last story is cut off at 20000 tokens
        assert tok.decode(ids[starts[k]:starts[k + 1]]) == stories[k]
    with pytest.raises(AnecyError, match="no tokenizer to encode"):
        tok.encode("Lily")


def test_builtin_pieces_are_llama2s(llama2):
    # every id the corpus uses decodes alone as the Llama-2 tokenizer decodes it mid-text
    sp, _ = llama2
    tok = T.builtin()
    for i in sorted(set(builtin_tokens(200000).tolist()) - {1}):
        assert tok.decode([263, i]) == sp.decode([263, i]), i
