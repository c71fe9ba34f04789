"""HF model directories (Qwen3 and Llama): load, save, round trip through transformers."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

from anecy import CheckpointError, ConfigError, Model, ModelConfig
from anecy.checkpoint import load_checkpoint
from anecy.hf import config_from_hf, load_pretrained, read_safetensors, save_pretrained

ROOT = Path(__file__).resolve().parents[1]


def tiny_qwen3(ratio, tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=89, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4 // ratio, head_dim=24,
                      rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    model = Qwen3ForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens[None].astype(np.int64))).logits[0].numpy()


@pytest.mark.parametrize("ratio", [1, 2, 4])
def test_qwen3_matches_hf_for_gqa_ratios(tmp_path, ratio):
    hf = tiny_qwen3(ratio)
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path, seq_len=29)
    assert ours.config.qk_norm and ours.config.n_kv_heads == 4 // ratio
    rng = np.random.default_rng(ratio)
    tokens = rng.integers(0, 89, 29).astype(np.int32)
    targets = rng.integers(0, 89, 29).astype(np.int32)
    ref = hf(torch.from_numpy(tokens[None].astype(np.int64))).logits[0]
    loss = torch.nn.functional.cross_entropy(ref, torch.from_numpy(targets.astype(np.int64)))
    loss.backward()
    ref = ref.detach().numpy()
    assert np.abs(ours.logits(tokens) - ref).max() <= 1e-5 * np.abs(ref).max()
    assert abs(ours.forward_backward(tokens, targets) - loss.item()) <= 1e-6 * loss.item()
    grads = ours.hf_grads()
    names = [n for n, _ in hf.named_parameters()]
    assert any("q_norm" in n for n in names) and any("k_norm" in n for n in names)
    for name, p in hf.named_parameters():
        err = np.linalg.norm(grads[name] - p.grad.numpy()) / np.linalg.norm(p.grad.numpy())
        assert err <= 1e-4, f"{name}: {err:.2e}"


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_through_a_saved_directory(tmp_path, tie):
    hf = tiny_qwen3(2, tie=tie)
    hf.save_pretrained(tmp_path / "a")
    ours = load_pretrained(tmp_path / "a", seq_len=16)
    save_pretrained(ours, tmp_path / "b")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b").float().eval()
    assert type(again).__name__ == "Qwen3ForCausalLM"
    tokens = np.arange(16, dtype=np.int32) * 5 % 89
    np.testing.assert_array_equal(hf_logits(again, tokens), hf_logits(hf, tokens))


def test_llama_directory_into_an_interleaved_model(tmp_path):
    # a stories-style model (interleaved RoPE) saved as HF Llama and read back
    cfg = ModelConfig(dim=32, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=50, seq_len=12)
    ours = Model(cfg, seed=7)
    save_pretrained(ours, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    tokens = np.arange(12, dtype=np.int32) * 3
    np.testing.assert_allclose(hf_logits(hf, tokens), ours.logits(tokens), rtol=0,
                               atol=1e-5 * np.abs(ours.logits(tokens)).max())


def test_bf16_and_sharded_directories(tmp_path):
    hf = tiny_qwen3(2)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    ours = load_pretrained(tmp_path / "bf16", seq_len=8)
    ref = {n: p.detach().float().numpy() for n, p in hf.named_parameters()}
    for name, value in ours.hf_state_dict().items():
        np.testing.assert_array_equal(value, ref[name])
    hf.float().save_pretrained(tmp_path / "shards", max_shard_size="40KB")
    assert (tmp_path / "shards" / "model.safetensors.index.json").exists()
    sharded = load_pretrained(tmp_path / "shards", seq_len=8)
    np.testing.assert_array_equal(sharded.params, ours.params)


def test_bad_directories(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        load_pretrained(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_pretrained(tmp_path / "empty")
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ConfigError, match="scaling"):
        config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "yarn"}})
    hf = tiny_qwen3(2)
    hf.save_pretrained(tmp_path / "cut")
    st = tmp_path / "cut" / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_pretrained(tmp_path / "cut")
    hf.save_pretrained(tmp_path / "partial")
    tensors = read_safetensors(tmp_path / "partial" / "model.safetensors")
    del tensors["model.norm.weight"]
    from anecy.hf import write_safetensors
    write_safetensors(tmp_path / "partial" / "model.safetensors", tensors)
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        load_pretrained(tmp_path / "partial")


def test_presets():
    q = ModelConfig.preset("qwen3-0.6b")
    assert (q.dim, q.hidden_dim, q.n_layers, q.n_heads, q.n_kv_heads, q.head_dim) == \
        (1024, 3072, 28, 16, 8, 128)
    assert (q.vocab_size, q.seq_len, q.norm_eps, q.rope_theta, q.rope_style) == \
        (151936, 256, 1e-6, 1e6, "half")
    assert q.qk_norm and q.tie_embeddings
    assert abs(q.n_params - 596e6) < 1e6
    t = ModelConfig.preset("qwen3-tiny")
    assert t.qk_norm and t.n_kv_heads < t.n_heads and t.head_dim != t.dim // t.n_heads


def run_qwen(args, cwd, **kw):
    return subprocess.run([sys.executable, str(ROOT / "train_qwen.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600, **kw)


def test_train_qwen_stop_and_resume_is_bit_identical(tmp_path):
    args = ["--preset", "qwen3-tiny", "--steps", "150", "--ckpt-every", "3", "--accum", "2",
            "--no-progress"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_qwen(args, tmp_path / "a").returncode == 0
    proc = subprocess.Popen([sys.executable, str(ROOT / "train_qwen.py"), *args],
                            cwd=tmp_path / "b", stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    start = time.time()
    while not (tmp_path / "b" / "qwen.ckpt").exists():
        assert proc.poll() is None and time.time() - start < 300
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    stopped = load_checkpoint(tmp_path / "b" / "qwen.ckpt")[0]["step"]
    assert 3 <= stopped < 150
    resumed = run_qwen(["--resume", "--no-progress"], tmp_path / "b")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed at step {stopped}" in resumed.stdout
    a = load_checkpoint(tmp_path / "a" / "qwen.ckpt")[1]
    b = load_checkpoint(tmp_path / "b" / "qwen.ckpt")[1]
    for name in ("params", "adam_m", "adam_v"):
        assert np.array_equal(a[name], b[name]), name


def test_train_qwen_errors(tmp_path):
    proc = run_qwen(["--resume"], tmp_path)
    assert proc.returncode == 2 and "no checkpoint at qwen.ckpt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_qwen(["--preset", "qwen3-tiny", "--init-from", str(tmp_path)], tmp_path)
    assert proc.returncode == 2 and "config.json" in proc.stderr
    hf = tiny_qwen3(2)
    hf.save_pretrained(tmp_path / "other")
    proc = run_qwen(["--preset", "qwen3-tiny", "--init-from", str(tmp_path / "other")], tmp_path)
    assert proc.returncode == 2 and "another model" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_train_qwen_init_from(tmp_path):
    cfg = ModelConfig.preset("qwen3-tiny")
    src = Model(cfg, seed=11)
    save_pretrained(src, tmp_path / "init")
    proc = run_qwen(["--preset", "qwen3-tiny", "--init-from", str(tmp_path / "init"),
                     "--steps", "1", "--lr", "1e-12", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    params = load_checkpoint(tmp_path / "qwen.ckpt")[1]["params"]
    # one update at lr 1e-12 leaves the loaded weights (not the seed-0 init) in place
    np.testing.assert_allclose(params, src.params, rtol=0, atol=1e-6)
    cfg_json = json.loads((tmp_path / "init" / "config.json").read_text())
    assert cfg_json["architectures"] == ["Qwen3ForCausalLM"]


# -- hostile and malformed files --------------------------------------------------------------
def safetensors_bytes(header: dict, data: bytes) -> bytes:
    blob = json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + data


def valid_safetensors():
    """(header, data) of a small file with F32, F16, BF16 and F64 tensors and a scalar."""
    rng = np.random.default_rng(0)
    parts = [("a", "F32", (3, 4), rng.standard_normal((3, 4)).astype("<f4")),
             ("b", "F16", (5,), rng.standard_normal(5).astype("<f2")),
             ("c", "BF16", (2, 2), rng.integers(0, 1 << 16, 4).astype("<u2")),
             ("d", "F64", (), np.array(1.5, "<f8")),
             ("e", "F32", (0, 3), np.zeros((0, 3), "<f4"))]
    header, data = {"__metadata__": {"format": "pt"}}, b""
    for name, dtype, shape, values in parts:
        raw = values.tobytes()
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


class GuardedSection:
    """The data section handed to the reader; fails the test on any read outside it."""

    def __init__(self, array):
        self.array = array

    def __getitem__(self, key):
        assert isinstance(key, slice) and key.step is None, key
        assert 0 <= key.start <= key.stop <= len(self.array), (key, len(self.array))
        return self.array[key]


JSON_VALUES = [None, True, False, 0, -1, 1, -256, 2**63, 2**70, 1.5, float("nan"), "", "F32",
               "BF16", [], [0], [-256, 0], [0, 2**64], [1, 0], {}, {"dtype": "F32"}, [[1]],
               "x" * 50]


def mutate(node, rng):
    """A copy of a JSON document with one random change at a random place."""
    if isinstance(node, dict) and node and rng.random() < 0.75:
        key = rng.choice(sorted(node))
        out = dict(node)
        action = rng.random()
        if action < 0.15:
            del out[key]
        elif action < 0.25:
            out[key + "x"] = out[key]  # a second tensor sharing (overlapping) the same bytes
        else:
            out[key] = mutate(node[key], rng)
        return out
    if isinstance(node, list) and node and rng.random() < 0.75:
        out = list(node)
        i = int(rng.integers(len(node)))
        if rng.random() < 0.2:
            del out[i]
        else:
            out[i] = mutate(node[i], rng)
        return out
    if isinstance(node, int) and not isinstance(node, bool) and rng.random() < 0.5:
        return node + int(rng.choice([-8, -4, -2, -1, 1, 2, 4, 8]))
    return JSON_VALUES[int(rng.integers(len(JSON_VALUES)))]


def test_safetensors_fuzz_only_anecy_errors_and_no_read_outside_the_data(tmp_path,
                                                                         monkeypatch):
    import anecy.hf as hf
    sections = []
    real_section = hf._data_section

    def guarded(path, base, length):
        sections.append((base, length))
        return GuardedSection(real_section(path, base, length))
    monkeypatch.setattr(hf, "_data_section", guarded)

    header, data = valid_safetensors()
    good = safetensors_bytes(header, data)
    rng = np.random.default_rng(1234)
    path = tmp_path / "fuzz.safetensors"
    outcomes = {"read": 0, "refused": 0}
    for case in range(3000):
        kind = case % 3
        if kind == 0:    # a structured change of the header
            blob = safetensors_bytes(mutate(header, rng), data)
        elif kind == 1:  # bytes of the header or its length field changed
            blob = bytearray(good)
            for _ in range(int(rng.integers(1, 4))):
                i = int(rng.integers(0, 8 + len(json.dumps(header))))
                blob[i] = int(rng.integers(256))
            blob = bytes(blob)
        else:            # cut or padded
            cut = int(rng.integers(0, len(good) + 16))
            blob = good[:cut] if cut <= len(good) else good + bytes(cut - len(good))
        path.write_bytes(blob)
        sections.clear()
        try:
            tensors = read_safetensors(path)
        except CheckpointError as e:
            assert str(e).startswith(str(path)), e
            outcomes["refused"] += 1
            continue
        # read: every tensor holds exactly the bytes its (checked) entry names
        outcomes["read"] += 1
        (base, length), = sections
        doc = json.loads(blob[8:base].decode("utf-8"))
        doc.pop("__metadata__", None)
        assert set(tensors) == set(doc)
        for name, info in doc.items():
            begin, end = info["data_offsets"]
            assert 0 <= begin <= end <= length
            raw = np.frombuffer(blob[base + begin:base + end], hf._DTYPES[info["dtype"]])
            want = ((raw.astype(np.uint32) << 16).view(np.float32) if info["dtype"] == "BF16"
                    else raw.astype(np.float32))
            np.testing.assert_array_equal(tensors[name].reshape(-1), want)
    assert outcomes["read"] > 100 and outcomes["refused"] > 1000, outcomes


def test_config_fuzz_only_config_errors():
    base = json.loads(json.dumps({**tiny_qwen3(2).config.to_dict(), "rope_scaling": None}))
    rng = np.random.default_rng(99)
    accepted = 0
    for _ in range(2000):
        doc = mutate(base, rng)
        try:
            cfg = config_from_hf(doc)
        except ConfigError:
            continue
        accepted += 1
        assert isinstance(cfg, ModelConfig)
    assert accepted > 100


@pytest.mark.parametrize("damage, words", [
    ("config_list", "config.json: must hold a JSON object, not a list"),
    ("no_model_type", "has no 'model_type' (architectures Qwen3ForCausalLM)"),
    ("string_layers", "'num_hidden_layers' must be a positive integer"),
    ("header_list", "not a JSON object"),
    ("no_offsets", "tensor 'model.norm.weight': data_offsets None"),
    ("negative_offsets", "tensor 'model.norm.weight': data_offsets [-256, 0]"),
    ("overlap", "overlaps"),
])
def test_train_qwen_refuses_hostile_directories(tmp_path, damage, words):
    src = tmp_path / "init"
    save_pretrained(Model(ModelConfig.preset("qwen3-tiny"), seed=1), src)
    cfg = json.loads((src / "config.json").read_text())
    st = src / "model.safetensors"
    blob = st.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    if damage == "config_list":
        cfg = [cfg]
    elif damage == "no_model_type":
        del cfg["model_type"]
    elif damage == "string_layers":
        cfg["num_hidden_layers"] = "2"
    elif damage == "header_list":
        header = [header]
    elif damage == "no_offsets":
        del header["model.norm.weight"]["data_offsets"]
    elif damage == "negative_offsets":
        header["model.norm.weight"]["data_offsets"] = [-256, 0]
    elif damage == "overlap":
        first = header["model.embed_tokens.weight"]["data_offsets"][0]
        size = 4 * ModelConfig.preset("qwen3-tiny").dim
        header["model.norm.weight"]["data_offsets"] = [first, first + size]
    (src / "config.json").write_text(json.dumps(cfg))
    st.write_bytes(safetensors_bytes(header, data))
    proc = run_qwen(["--preset", "qwen3-tiny", "--init-from", str(src), "--steps", "1",
                     "--no-progress"], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert words in lines[0], lines[0]
    where = "config.json" if "config" in damage or "type" in damage or "layers" in damage \
        else "model.safetensors"
    assert where in lines[0]
    assert not (tmp_path / "qwen.ckpt").exists()
