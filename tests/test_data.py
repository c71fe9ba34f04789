import json

import numpy as np
import pytest

from anecy import data
from anecy.data import TokenSampler, VocabMap, default_data_path, open_tokens
from anecy.errors import DataError


def write_tokens(path, ids):
    np.asarray(ids, dtype="<u2").tofile(path)
    return path


# -- open_tokens ----------------------------------------------------------------------------

def test_open_tokens_maps_the_file_read_only(tmp_path):
    path = write_tokens(tmp_path / "t.bin", [1, 5, 31999, 7, 0])
    tokens = open_tokens(path, vocab_size=32000, seq_len=4)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == [1, 5, 31999, 7, 0]
    with pytest.raises(ValueError):
        tokens[0] = 2


def test_open_tokens_missing_file(tmp_path):
    with pytest.raises(DataError, match="no such token file") as e:
        open_tokens(tmp_path / "nope.bin", 32000, 4)
    assert "nope.bin" in str(e.value)


def test_open_tokens_directory(tmp_path):
    with pytest.raises(DataError, match="is a directory"):
        open_tokens(tmp_path, 32000, 4)


def test_open_tokens_unreadable_path(tmp_path):
    not_a_dir = write_tokens(tmp_path / "file.bin", [1, 2, 3])
    with pytest.raises(DataError, match="cannot read") as e:
        open_tokens(not_a_dir / "t.bin", 32000, 1)
    assert "file.bin" in str(e.value)


def test_open_tokens_odd_length(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x00\x02\x00\x03")
    with pytest.raises(DataError, match="odd length of 5 bytes") as e:
        open_tokens(path, 32000, 1)
    assert "odd.bin" in str(e.value)


@pytest.mark.parametrize("n", [0, 4])
def test_open_tokens_too_short(tmp_path, n):
    path = write_tokens(tmp_path / "short.bin", [1] * n)
    with pytest.raises(DataError, match=f"{n} tokens, need at least seq_len \\+ 1 = 5"):
        open_tokens(path, 32000, seq_len=4)


def test_open_tokens_reports_first_out_of_vocab_id(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_CHUNK", 8)  # the bad ids sit in a later chunk
    ids = [1] * 30
    ids[21], ids[27] = 40000, 32000
    path = write_tokens(tmp_path / "oov.bin", ids)
    with pytest.raises(DataError, match="token id 40000 at position 21 is not below "
                                        "vocab_size 32000") as e:
        open_tokens(path, 32000, 4)
    assert "oov.bin" in str(e.value) and "\n" not in str(e.value)


def test_default_data_path(monkeypatch):
    monkeypatch.delenv("ANECY_DATA", raising=False)
    assert default_data_path().name == "tinystories_data00.bin"
    assert not default_data_path().is_absolute()
    monkeypatch.setenv("ANECY_DATA", "/data/stories.bin")
    assert str(default_data_path()) == "/data/stories.bin"


# -- TokenSampler ---------------------------------------------------------------------------

def positions(n=10_000):
    """Tokens equal to their position, so a window tells where it was taken."""
    return np.arange(n, dtype=np.uint16)


def draw(sampler, k):
    return [sampler.next_train() for _ in range(k)]


def test_windows_are_shifted_int32_pairs():
    sampler = TokenSampler(positions(), seq_len=16, seed=0)
    x, y = sampler.next_train()
    assert x.dtype == y.dtype == np.int32 and x.shape == y.shape == (16,)
    assert (y == x + 1).all()
    for x, y in sampler.val_batches(3):
        assert x.dtype == np.int32 and x.shape == (16,) and (y == x + 1).all()


def test_same_seed_same_windows_different_seed_different():
    a, b, c = (TokenSampler(positions(), 16, seed) for seed in (3, 3, 4))
    starts = [[int(x[0]) for x, _ in draw(s, 20)] for s in (a, b, c)]
    assert starts[0] == starts[1]
    assert starts[0] != starts[2]


def test_train_windows_stay_out_of_the_held_out_tail():
    tokens = positions(2000)
    sampler = TokenSampler(tokens, seq_len=16, seed=0, val_fraction=0.1)
    assert sampler.n_train == 1800
    windows = draw(sampler, 20_000)
    assert max(int(y[-1]) for _, y in windows) == sampler.n_train - 1  # yet reachable
    assert min(int(x[0]) for x, _ in windows) == 0


def test_val_windows_are_fixed_evenly_spaced_and_in_the_tail():
    sampler = TokenSampler(positions(2000), seq_len=16, seed=0, val_fraction=0.1)
    batches = sampler.val_batches(5)
    starts = [int(x[0]) for x, _ in batches]
    assert starts[0] == sampler.n_train and int(batches[-1][1][-1]) == 1999
    assert len(set(np.diff(starts))) <= 2  # even up to rounding
    draw(sampler, 10)
    again = TokenSampler(positions(2000), 16, seed=9, val_fraction=0.1).val_batches(5)
    assert all((x1 == x2).all() for (x1, _), (x2, _) in zip(batches, again))


def test_tail_holds_at_least_one_window():
    sampler = TokenSampler(positions(100), seq_len=16, seed=0)
    assert sampler.n_train == 100 - 17
    assert len(sampler.val_batches(1)) == 1


def test_too_little_data_for_train_and_validation():
    TokenSampler(positions(34), seq_len=16, seed=0)
    with pytest.raises(DataError, match="need at least 34"):
        TokenSampler(positions(33), seq_len=16, seed=0)


def test_state_dict_round_trip_continues_exactly():
    uninterrupted = TokenSampler(positions(), 32, seed=7)
    expected = draw(uninterrupted, 50)

    first = TokenSampler(positions(), 32, seed=7)
    head = draw(first, 20)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["drawn"] == 20
    draw(first, 5)  # drawn after the checkpoint, so lost

    resumed = TokenSampler(positions(), 32, seed=123)
    resumed.load_state_dict(state)
    tail = draw(resumed, 30)
    assert resumed.state_dict()["drawn"] == 50
    for (x1, y1), (x2, y2) in zip(expected, head + tail):
        assert (x1 == x2).all() and (y1 == y2).all()


def test_state_dict_of_other_data_is_refused():
    state = TokenSampler(positions(), 32, seed=7).state_dict()
    with pytest.raises(DataError, match="sampler state"):
        TokenSampler(positions(5000), 32, seed=7).load_state_dict(state)


# -- VocabMap -------------------------------------------------------------------------------

def test_vocab_map_from_tokens(monkeypatch):
    monkeypatch.setattr(data, "_CHUNK", 4)
    tokens = np.array([1, 9, 9, 3, 1, 0, 7, 3, 1, 12], dtype=np.uint16)
    vmap = VocabMap.from_tokens(tokens, vocab_size=16)
    assert vmap.active_ids.dtype == np.int32 and vmap.active_ids.tolist() == [0, 1, 3, 7, 9, 12]
    assert vmap.n_active == 6 and vmap.vocab_size == 16 and not vmap.is_identity
    assert vmap.to_compact.dtype == np.int32 and vmap.to_compact.shape == (16,)
    assert vmap.to_compact.tolist() == [0, 1, -1, 2, -1, -1, -1, 3, -1, 4, -1, -1, 5, -1, -1, -1]
    compact = vmap.compact(tokens)
    assert compact.dtype == np.int32 and compact.tolist() == [1, 4, 4, 2, 1, 0, 3, 2, 1, 5]
    assert (vmap.expand(compact) == tokens).all()
    assert (vmap.compact(vmap.active_ids) == np.arange(6)).all()
    assert vmap.describe() == "vocab compaction: 16 -> 6 active tokens"


def test_vocab_map_full_is_identity():
    vmap = VocabMap.full(32000)
    assert vmap.is_identity and vmap.n_active == 32000
    ids = np.array([[0, 5], [31999, 1]])
    assert (vmap.compact(ids) == ids).all() and (vmap.expand(ids) == ids).all()
    assert "32000" in vmap.describe()


def test_vocab_map_rebuilt_from_active_ids():
    vmap = VocabMap.from_tokens(np.array([4, 2, 8, 2], dtype=np.uint16), 10)
    again = VocabMap(vmap.active_ids.tolist(), 10)
    assert (again.to_compact == vmap.to_compact).all()


@pytest.mark.parametrize("bad", [5, -1, 16])
def test_vocab_map_compact_refuses_inactive_ids(bad):
    vmap = VocabMap.from_tokens(np.array([1, 2, 3], dtype=np.uint16), 16)
    with pytest.raises(DataError, match=f"token id {bad} is not in the active vocabulary"):
        vmap.compact([1, bad, 2])


def test_vocab_map_from_tokens_out_of_vocab():
    with pytest.raises(DataError, match="token id 20 at position 1"):
        VocabMap.from_tokens(np.array([1, 20, 3], dtype=np.uint16), 16)


def test_large_vocabularies_use_uint32_files(tmp_path):
    from anecy.data import token_dtype
    assert token_dtype(32000) == np.dtype("<u2") and token_dtype(151936) == np.dtype("<u4")
    ids = np.array([0, 70000, 151935, 5] * 40, dtype="<u4")
    ids.tofile(tmp_path / "q.bin")
    tokens = open_tokens(tmp_path / "q.bin", 151936, 16)
    assert tokens.dtype == np.dtype("<u4") and np.array_equal(tokens, ids)
    (tmp_path / "bad.bin").write_bytes(ids.tobytes()[:-2])
    with pytest.raises(DataError, match="multiple of 4"):
        open_tokens(tmp_path / "bad.bin", 151936, 16)
    np.array([151936] * 40, dtype="<u4").tofile(tmp_path / "oov.bin")
    with pytest.raises(DataError, match="not below"):
        open_tokens(tmp_path / "oov.bin", 151936, 16)


# -- the sidecar `anecy prepare` writes ---------------------------------------------------------

def write_sidecar(path, **fields):
    meta = {"format": data.SIDECAR_FORMAT, "tokenizer": {"kind": "hf", "path": "/t/tok.json"},
            "vocab_size": 1000, "dtype": "uint16", "tokens": 0}
    meta.update(fields)
    data.sidecar_path(path).write_text(json.dumps(meta))
    return meta


def test_read_sidecar(tmp_path):
    path = write_tokens(tmp_path / "t.bin", [1, 2, 3])
    assert data.read_sidecar(path) is None
    meta = write_sidecar(path, tokens=3)
    assert data.sidecar_path(path) == tmp_path / "t.bin.json"
    assert data.read_sidecar(path) == meta
    data.sidecar_path(path).write_text("{not json")
    with pytest.raises(DataError, match="t.bin.json: corrupt token file sidecar"):
        data.read_sidecar(path)
    write_sidecar(path, format="something-else")
    with pytest.raises(DataError, match="not an anecy token file sidecar"):
        data.read_sidecar(path)
    write_sidecar(path, dtype="float32")
    with pytest.raises(DataError, match="unknown dtype 'float32'"):
        data.read_sidecar(path)
    write_sidecar(path, vocab_size="big")
    with pytest.raises(DataError, match="'vocab_size' missing or not int"):
        data.read_sidecar(path)


def test_open_tokens_takes_the_dtype_from_the_sidecar(tmp_path):
    # a 1000-token vocabulary written as uint32: without the sidecar, a 151936-token model
    # would read it as uint32 anyway, but a 32000-token model would read uint16 garbage
    path = tmp_path / "t.bin"
    np.asarray([1, 999, 5, 7, 0, 3], dtype="<u4").tofile(path)
    write_sidecar(path, dtype="uint32", tokens=6)
    tokens = open_tokens(path, vocab_size=32000, seq_len=4)
    assert tokens.dtype == np.uint32 and tokens.tolist() == [1, 999, 5, 7, 0, 3]


def test_open_tokens_refuses_a_larger_vocabulary(tmp_path):
    path = write_tokens(tmp_path / "t.bin", [1, 2, 3, 4, 5, 6])
    write_sidecar(path, vocab_size=50000, tokens=6)
    with pytest.raises(DataError, match="tokenized for 50000 tokens .*hf tokenizer /t/tok.json"
                                        ".*model's vocabulary of 32000"):
        open_tokens(path, 32000, 4)


def test_open_tokens_refuses_a_sidecar_of_another_file(tmp_path):
    path = write_tokens(tmp_path / "t.bin", [1, 2, 3, 4, 5, 6])
    write_sidecar(path, tokens=7)
    with pytest.raises(DataError, match="12 bytes, but its sidecar says 7 uint16 tokens"):
        open_tokens(path, 32000, 4)


def test_open_held_out(tmp_path):
    path = write_tokens(tmp_path / "t.bin", range(10))
    write_sidecar(path, tokens=10)
    assert data.open_held_out(path, 32000, 4) is None
    write_sidecar(path, tokens=10, val={"path": "t.val.bin", "documents": 1, "tokens": 6})
    with pytest.raises(DataError, match="its held-out file .*t.val.bin is missing"):
        data.open_held_out(path, 32000, 4)
    write_tokens(tmp_path / "t.val.bin", [1, 7, 8, 9, 10, 11])
    assert data.open_held_out(path, 32000, 4).tolist() == [1, 7, 8, 9, 10, 11]


def test_sampler_with_a_held_out_file():
    tokens, val = np.arange(100, dtype=np.uint16), np.arange(500, 540, dtype=np.uint16)
    sampler = TokenSampler(tokens, seq_len=16, seed=0, val_tokens=val)
    assert sampler.n_train == 100
    starts = {int(sampler.next_train()[0][0]) for _ in range(2000)}
    assert starts == set(range(0, 100 - 16))    # every training window, none beyond
    batches = sampler.val_batches(3)
    assert [int(x[0]) for x, _ in batches] == [500, 512, 523]   # evenly over 0..23
    x, y = batches[-1]
    assert x.tolist() == list(range(523, 539)) and y.tolist() == list(range(524, 540))
    with pytest.raises(DataError, match="too few"):
        TokenSampler(tokens, seq_len=16, seed=0, val_tokens=val[:16])
    vocab = VocabMap.from_tokens(tokens, 1000, val)
    assert vocab.n_active == 140
