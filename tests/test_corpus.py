import functools

import numpy as np
import pytest

from anecy import corpus
from anecy.corpus import BUILTIN_NOTICE, builtin_stories, builtin_tokens
from conftest import require_module, require_shared


@functools.cache
def load_tokenizer():
    # Called inside the tests, not at import, so that only the tests that need the
    # tokenizer skip (or, under CI, fail) without it.
    sentencepiece = require_module("sentencepiece", 'pip install -e ".[test]"',
                                   "the corpus is checked against SentencePiece")
    path = require_shared("data", "llama2-tokenizer", "tokenizer.model",
                          why="the corpus is checked against the Llama-2 tokenizer")
    return sentencepiece.SentencePieceProcessor(model_file=str(path))


def llama2c_pretokenize(sp, stories):
    """What llama2.c's `tinystories.py pretokenize` writes for these stories."""
    ids = []
    for text in stories:
        ids += [sp.bos_id()] + sp.encode(text.strip())
    return ids


@pytest.fixture(scope="module")
def tokens():
    return builtin_tokens()


def test_tokens_are_llama2_tokenization_of_the_stories():
    sp = load_tokenizer()
    for seed in (0, 1):
        stories = builtin_stories(300, seed)
        for text in stories:
            assert list(corpus._encode(" " + text)) == llama2c_pretokenize(sp, [text]), text
        expected = llama2c_pretokenize(sp, stories)
        assert builtin_tokens(len(expected), seed).tolist() == expected


def test_ids_decode_to_the_stories():
    sp = load_tokenizer()
    stories = builtin_stories(200, seed=3)
    ids = builtin_tokens(len(llama2c_pretokenize(sp, stories)), seed=3).tolist()
    starts = [i for i, t in enumerate(ids) if t == sp.bos_id()] + [len(ids)]
    decoded = [sp.decode(ids[a + 1:b]) for a, b in zip(starts, starts[1:])]
    assert decoded == stories


def test_table_matches_the_tokenizer():
    sp = load_tokenizer()
    for piece, ids in corpus._IDS.items():
        assert list(ids) == sp.encode("a" + piece)[1:], piece


def test_default_corpus(tokens):
    assert tokens.dtype == np.uint16 and tokens.shape == (corpus.DEFAULT_TOKENS,)
    assert tokens[0] == corpus.BOS and tokens.max() < 32000
    stories = int((tokens == corpus.BOS).sum())
    assert 5_000 < stories < 20_000
    # every piece of the table shows up, so none of it is dead weight
    used = set(tokens.tolist())
    assert all(set(ids) <= used for ids in corpus._IDS.values())


def test_deterministic(tokens):
    assert (builtin_tokens() == tokens).all()
    assert builtin_stories(50) == builtin_stories(50)
    assert builtin_stories(50, seed=1) != builtin_stories(50)
    assert not (builtin_tokens(10_000, seed=1) == tokens[:10_000]).all()
    assert (builtin_tokens(10_000) == tokens[:10_000]).all()


def test_sizes():
    assert builtin_tokens(1).tolist() == [corpus.BOS]
    assert len(builtin_tokens(12_345)) == 12_345
    with pytest.raises(ValueError):
        builtin_tokens(0)


def test_stories_vary():
    stories = builtin_stories(500)
    assert len(set(stories)) == 500
    assert all(s == s.strip() and s[0].isupper() for s in stories)


def test_notice_is_one_line():
    assert "\n" not in BUILTIN_NOTICE
    for needed in ("tinystories_data00.bin", "--data", "$ANECY_DATA", "roneneldan/TinyStories",
                   "tinystories.py pretokenize"):
        assert needed in BUILTIN_NOTICE
