"""Tests for anecy.checkpoint: round trips, into= loading, corruption and atomicity."""

import json
import os
import struct
import zlib

import numpy as np
import pytest

from anecy import checkpoint as ck
from anecy.checkpoint import FORMAT_VERSION, load_checkpoint, read_checkpoint_meta, save_checkpoint
from anecy.errors import CheckpointError

META = {
    "model": {"dim": 64, "n_layers": 2, "norm_eps": 1e-5, "name": "tiny-é"},
    "train": {"lr": 3e-4, "schedule": ["warmup", {"steps": 10}], "tie": True, "extra": None},
    "step": 12345,
    "rng": {"state": 2**100 + 7, "inc": [1, 2, 3]},
    "timings": {"fwd": 1.5, "bwd": 2.25},
}


def sample_arrays():
    rng = np.random.default_rng(0)
    return {
        "weights": rng.standard_normal(100).astype(np.float32),
        "m": rng.standard_normal((7, 13)).astype(np.float16),
        "f64": rng.standard_normal((2, 3, 4)),
        "i8": np.arange(-5, 5, dtype=np.int8),
        "u64": np.array([0, 2**64 - 1], dtype=np.uint64),
        "mask": np.array([True, False, True]),
        "c64": np.array([1 + 2j, -3j], dtype=np.complex64),
        "scalar": np.array(42, dtype=np.int64),  # 0-d
        "empty": np.zeros((0, 5), dtype=np.float32),
        "empty1": np.zeros(0, dtype=np.uint8),
        "strided": np.arange(60, dtype=np.int32).reshape(6, 10)[::2, 1::3],  # not contiguous
        "bigend": np.arange(9, dtype=">f8").reshape(3, 3),  # stored little-endian
        "text": np.array(["ab", "ćd", ""]),
    }


def assert_same(got, want):
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert g.shape == w.shape, k
        assert g.dtype == w.dtype.newbyteorder("<") or g.dtype == w.dtype, k
        assert np.array_equal(g, w), k


@pytest.fixture
def ckpt(tmp_path):
    """A small valid checkpoint and its bytes."""
    p = tmp_path / "c.ckpt"
    save_checkpoint(p, META, sample_arrays(), fsync=False)
    return p, p.read_bytes()


# ----------------------------------------------------------------- round trips


def test_round_trip(tmp_path):
    p = tmp_path / "deep" / "dir" / "c.ckpt"  # parent directories are created
    save_checkpoint(p, META, sample_arrays())  # default fsync=True path
    meta, arrays = load_checkpoint(p)
    assert meta == META
    assert_same(arrays, sample_arrays())
    assert os.listdir(p.parent) == ["c.ckpt"]


def test_layout(ckpt):
    p, raw = ckpt
    magic, version, hcrc, hlen, total = struct.unpack_from("<8sIIQQ", raw)
    assert (magic, version, total) == (b"ANECYCKP", FORMAT_VERSION, len(raw))
    assert (32 + hlen) % 64 == 0 and zlib.crc32(raw[32 : 32 + hlen]) == hcrc
    info = read_checkpoint_meta(p)
    assert info["format_version"] == FORMAT_VERSION and info["meta"] == META
    for name, a in sample_arrays().items():
        e = info["arrays"][name]
        assert e["offset"] % 64 == 0 and e["shape"] == list(a.shape) and e["nbytes"] == a.nbytes
        assert e["dtype"] == a.dtype.newbyteorder("<").str or e["dtype"] == a.dtype.str
        le = np.ascontiguousarray(a, dtype=np.dtype(e["dtype"]))
        assert raw[e["offset"] : e["offset"] + e["nbytes"]] == le.tobytes()
    assert raw[-4:] == b"CEND" and struct.unpack("<I", raw[-8:-4])[0] == zlib.crc32(raw[:-8])


def test_chunked_round_trip(tmp_path, monkeypatch):
    # Tiny chunks exercise the chunk loops (ragged last chunk, strided and
    # byte-swapped paths) without multi-GB files.
    monkeypatch.setattr(ck, "CHUNK", 1000)
    arrays = {
        "flat": np.random.default_rng(1).random(12345, dtype=np.float32),
        "strided": np.arange(20000, dtype=np.int64).reshape(100, 200)[:, ::3],
        "bigend": np.arange(3333, dtype=">i4"),
    }
    p = tmp_path / "c.ckpt"
    save_checkpoint(p, {"step": 1}, arrays, fsync=False)
    meta, got = load_checkpoint(p)
    assert meta == {"step": 1}
    assert_same(got, arrays)


def test_no_arrays(tmp_path):
    p = tmp_path / "c.ckpt"
    save_checkpoint(p, {}, {}, fsync=False)
    assert load_checkpoint(p) == ({}, {})


def test_overwrite(tmp_path):
    p = tmp_path / "c.ckpt"
    save_checkpoint(p, {"step": 1}, {"w": np.zeros(3)}, fsync=False)
    save_checkpoint(p, {"step": 2}, {"w": np.ones(5)}, fsync=False)
    meta, arrays = load_checkpoint(p)
    assert meta == {"step": 2} and np.array_equal(arrays["w"], np.ones(5))


# ----------------------------------------------------------------- into=


def test_load_into(ckpt):
    p, _ = ckpt
    w = np.full(100, np.nan, dtype=np.float32)
    s = np.zeros((), dtype=np.int64)
    e = np.zeros((0, 5), dtype=np.float32)
    meta, arrays = load_checkpoint(p, into={"weights": w, "scalar": s, "empty": e})
    assert arrays["weights"] is w and arrays["scalar"] is s and arrays["empty"] is e
    assert_same(arrays, sample_arrays())
    assert meta == META


def test_only_keeps_the_named_arrays_and_still_checks_everything(ckpt, monkeypatch):
    p, raw = ckpt
    want = sample_arrays()
    meta, got = load_checkpoint(p, only=("weights", "i8", "not-there"))
    assert meta == META and sorted(got) == ["i8", "weights"]
    assert np.array_equal(got["weights"], want["weights"])
    dst = np.empty_like(want["f64"])
    _, got = load_checkpoint(p, into={"f64": dst}, only=())
    assert list(got) == ["f64"] and got["f64"] is dst and np.array_equal(dst, want["f64"])
    # a flipped byte inside an array that is skipped still fails the checksum
    doc = ck._read_header(open(p, "rb"), p)[0]
    m = next(e for e in doc["arrays"] if e["name"] == "m")
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, bytes([raw[m["offset"] + 3] ^ 0x04]), m["offset"] + 3)
        with pytest.raises(CheckpointError, match="checksum"):
            load_checkpoint(p, only=("weights",))
    finally:
        os.pwrite(fd, raw[m["offset"] + 3 : m["offset"] + 4], m["offset"] + 3)
        os.close(fd)
    # skipped arrays stream through one chunk, several chunks long here
    monkeypatch.setattr(ck, "CHUNK", 4096)
    big = {"w": np.arange(1, 30001, dtype=np.float32), "m": np.ones(50000, np.float32)}
    save_checkpoint(p, META, big, fsync=False)
    _, got = load_checkpoint(p, only=("w",))
    assert list(got) == ["w"] and np.array_equal(got["w"], big["w"])


def test_only_does_not_allocate_the_skipped_arrays(tmp_path):
    """Loading the weights of a checkpoint whose other arrays are four times their size
    allocates little more than the weights (tracemalloc sees numpy's allocations)."""
    import tracemalloc
    p = tmp_path / "big.ckpt"
    n = 1 << 20
    save_checkpoint(p, META, {"params": np.ones(n, np.float32),
                              "m": np.ones(2 * n, np.float32), "v": np.ones(2 * n, np.float32)},
                    fsync=False)
    peaks = {}
    for only in (None, ("params",)):
        tracemalloc.start()
        _, got = load_checkpoint(p, only=only)
        peaks[only] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del got
    assert peaks[None] > 4.5 * 4 * n
    assert peaks[("params",)] < 4 * n + 2 * ck.CHUNK


@pytest.mark.parametrize(
    "dst, words",
    [
        (np.zeros(99, dtype=np.float32), ["weights", "(100,)"]),
        (np.zeros(100, dtype=np.float64), ["weights", "float32"]),
        (np.zeros(200, dtype=np.float32)[::2], ["weights", "contiguous"]),
        ([0.0] * 100, ["weights", "list"]),
    ],
)
def test_load_into_mismatch(ckpt, dst, words):
    p, _ = ckpt
    before = np.array(dst, copy=True)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p, into={"weights": dst})
    msg = str(ei.value)
    assert str(p) in msg and "\n" not in msg and all(w in msg for w in words)
    assert np.array_equal(np.asarray(dst), before)  # checked before anything is read


def test_load_into_unknown_name(ckpt):
    p, _ = ckpt
    with pytest.raises(CheckpointError, match="nope"):
        load_checkpoint(p, into={"nope": np.zeros(3)})


def test_into_corrupt_mentions_partial(ckpt):
    p, raw = ckpt
    off = read_checkpoint_meta(p)["arrays"]["weights"]["offset"]
    p.write_bytes(raw[:off] + bytes([raw[off] ^ 1]) + raw[off + 1 :])
    with pytest.raises(CheckpointError, match="corrupt") as ei:
        load_checkpoint(p, into={"weights": np.zeros(100, dtype=np.float32)})
    assert ei.value.into_partial      # an attribute for callers; the message is for users
    assert "into=" not in str(ei.value)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    assert not ei.value.into_partial


# ----------------------------------------------------------------- damaged files


def load_error(p):
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint(p)
    msg = str(ei.value)
    assert str(p) in msg and "\n" not in msg
    return msg


def test_truncation_everywhere(ckpt):
    p, raw = ckpt
    hlen = struct.unpack_from("<Q", raw, 16)[0]
    # Every cut of this small file: inside prefix, header, payload, checksum.
    # Cutting longest-first lets os.truncate shorten one file in place (fast).
    assert 32 < 32 + hlen < len(raw) - 8
    for n in range(len(raw) - 1, -1, -1):
        os.truncate(p, n)
        msg = load_error(p)
        assert "truncated" in msg or "corrupt" in msg, (n, msg)
        if n >= 32:  # the recorded length catches it cheaply, before the payload
            with pytest.raises(CheckpointError, match="truncated"):
                read_checkpoint_meta(p)


def test_trailing_junk(ckpt):
    p, raw = ckpt
    p.write_bytes(raw + b"\0")
    assert "corrupt" in load_error(p)


def flip_and_load(p, raw, positions, mask):
    """Flip one byte in place (pwrite, no rewrite of the file), expect a failed load, restore."""
    fd = os.open(p, os.O_RDWR)
    try:
        for pos in positions:
            os.pwrite(fd, bytes([raw[pos] ^ mask]), pos)
            load_error(p)
            os.pwrite(fd, raw[pos : pos + 1], pos)
    finally:
        os.close(fd)
    assert load_checkpoint(p)[0] is not None  # restored intact


def test_every_byte_flip(ckpt):
    p, raw = ckpt
    flip_and_load(p, raw, range(len(raw)), 0x01)  # small file: every position
    flip_and_load(p, raw, range(0, len(raw), 3), 0x80)


def test_byte_flips_multichunk(tmp_path, monkeypatch):
    monkeypatch.setattr(ck, "CHUNK", 4096)
    p = tmp_path / "c.ckpt"
    save_checkpoint(p, META, {"w": np.random.default_rng(2).random(50000, dtype=np.float32)},
                    fsync=False)
    raw = p.read_bytes()
    sample = np.random.default_rng(3).integers(0, len(raw), 200).tolist() + [len(raw) - 1]
    flip_and_load(p, raw, sample, 0x10)


def test_bad_magic(ckpt, tmp_path):
    p, raw = ckpt
    p.write_bytes(b"PK\x03\x04" + raw[4:])
    assert "not an anecy checkpoint" in load_error(p)
    q = tmp_path / "junk.txt"
    q.write_bytes(b"hello")
    assert "not an anecy checkpoint" in load_error(q)


def test_future_version(ckpt):
    p, raw = ckpt
    p.write_bytes(raw[:8] + struct.pack("<I", FORMAT_VERSION + 1) + raw[12:])
    msg = load_error(p)
    assert "newer" in msg and str(FORMAT_VERSION + 1) in msg
    with pytest.raises(CheckpointError, match="newer"):
        read_checkpoint_meta(p)


def write_with_header(p, header: bytes, payload: bytes = b""):
    """A file whose lengths and CRCs are all right around an arbitrary header."""
    total = 32 + len(header) + len(payload) + 8
    body = struct.pack("<8sIIQQ", b"ANECYCKP", FORMAT_VERSION, zlib.crc32(header), len(header),
                       total)
    body += header + payload
    p.write_bytes(body + struct.pack("<I4s", zlib.crc32(body), b"CEND"))


@pytest.mark.parametrize(
    "header, words",
    [
        (b'{"meta": {', "malformed header JSON"),
        (b"\xff\xfe", "malformed header JSON"),
        (b"[1, 2]", "malformed header"),
        (b'{"meta": {}, "arrays": [{"name": "w"}]}', "malformed header"),
        (b'{"meta": {}, "arrays": [{"name": "w", "dtype": "<f4", "shape": [100], '
         b'"offset": 64, "nbytes": 400}]}',
         "does not fit"),
        (b'{"meta": {}, "arrays": [{"name": "w", "dtype": "|O", "shape": [1], '
         b'"offset": 64, "nbytes": 8}]}',
         "dtype"),
    ],
)
def test_malformed_header(tmp_path, header, words):
    p = tmp_path / "c.ckpt"
    write_with_header(p, header)
    assert words in load_error(p)
    with pytest.raises(CheckpointError, match=words):
        read_checkpoint_meta(p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.ckpt"
    assert "no such file" in load_error(p)
    with pytest.raises(CheckpointError, match="no such file"):
        read_checkpoint_meta(p)


def test_meta_reads_header_only(ckpt):
    p, raw = ckpt
    # Wreck the whole payload: the header is still readable, a full load is not.
    start = 32 + struct.unpack_from("<Q", raw, 16)[0]
    p.write_bytes(raw[:start] + bytes(len(raw) - 8 - start) + raw[-8:])
    info = read_checkpoint_meta(p)
    assert info["meta"] == META and set(info["arrays"]) == set(sample_arrays())
    assert "corrupt" in load_error(p)


# ----------------------------------------------------------------- writing failures


def test_unwritable_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    p = blocker / "c.ckpt"  # parent is a regular file
    with pytest.raises(CheckpointError, match="cannot write") as ei:
        save_checkpoint(p, {}, {"w": np.zeros(3)}, fsync=False)
    assert str(p) in str(ei.value)
    d = tmp_path / "adir"
    d.mkdir()
    with pytest.raises(CheckpointError, match="cannot write"):  # target is a directory
        save_checkpoint(d, {}, {}, fsync=False)
    assert sorted(os.listdir(tmp_path)) == ["adir", "file"]


def test_bad_inputs(tmp_path):
    p = tmp_path / "c.ckpt"
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(p, {"x": object()}, {}, fsync=False)
    with pytest.raises(CheckpointError, match="dtype"):
        save_checkpoint(p, {}, {"o": np.array([None])}, fsync=False)
    with pytest.raises(CheckpointError, match="name"):
        save_checkpoint(p, {}, {3: np.zeros(1)}, fsync=False)
    assert os.listdir(tmp_path) == []


def previous(tmp_path):
    p = tmp_path / "c.ckpt"
    save_checkpoint(p, {"step": 1}, {"w": np.arange(5000, dtype=np.float32)}, fsync=False)
    return p, p.read_bytes()


def assert_untouched(p, raw):
    assert p.read_bytes() == raw
    assert os.listdir(p.parent) == [p.name]  # no temporary left behind
    assert load_checkpoint(p)[0] == {"step": 1}


def test_replace_fails(tmp_path, monkeypatch):
    p, raw = previous(tmp_path)

    def boom(src, dst):
        assert os.path.basename(src) == f"c.ckpt.tmp-{os.getpid()}"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(p, {"step": 2}, {"w": np.zeros(5000, dtype=np.float32)}, fsync=False)
    assert_untouched(p, raw)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError, OSError])
def test_interrupted_mid_payload(tmp_path, monkeypatch, exc):
    p, raw = previous(tmp_path)
    real = ck._stream_array
    calls = []

    def flaky(f, a, crc):
        calls.append(1)
        if len(calls) == 2:  # first array fully written, die in the second
            f.write(b"partial")
            raise exc("interrupted")
        return real(f, a, crc)

    monkeypatch.setattr(ck, "_stream_array", flaky)
    arrays = {"a": np.ones(5000, dtype=np.float32), "b": np.ones(5000, dtype=np.float32)}
    with pytest.raises(CheckpointError if exc is OSError else exc):
        save_checkpoint(p, {"step": 2}, arrays)
    assert len(calls) == 2
    assert_untouched(p, raw)


def test_interrupted_on_fsync(tmp_path, monkeypatch):
    p, raw = previous(tmp_path)

    def fsync(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(p, {"step": 2}, {"w": np.zeros(3)})
    assert_untouched(p, raw)


def test_meta_json_is_standard_and_roundtrips_header(ckpt):
    p, raw = ckpt
    hlen = struct.unpack_from("<Q", raw, 16)[0]
    doc = json.loads(raw[32 : 32 + hlen])  # plain JSON, readable by any tool
    assert doc["meta"] == META and [e["name"] for e in doc["arrays"]] == list(sample_arrays())
