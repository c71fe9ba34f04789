"""Hugging Face model directories: read one into a Model, write a Model as one.

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Llama (``LlamaForCausalLM``) and Qwen3
(``Qwen3ForCausalLM``) configurations are understood. The safetensors format (an
8-byte header length, a JSON header, raw little-endian tensors) is read and written
here directly, so bf16 checkpoints (numpy has no bf16) load without PyTorch."""

import json
import os
from pathlib import Path

import numpy as np

from . import jsonio
from .config import ModelConfig
from .errors import CheckpointError, ConfigError, cannot_read
from .fileio import atomic_write
from .model import Model

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
           "F64": np.dtype("<f8")}


# -- configuration -------------------------------------------------------------------------
_INT_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "vocab_size")
_OPTIONAL_INT_KEYS = ("num_key_value_heads", "head_dim")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def config_from_hf(hf: dict, seq_len: int = 256) -> ModelConfig:
    """ModelConfig of an HF config.json dict (training sequence length `seq_len`). Every
    key read is type-checked: a malformed config is a ConfigError naming the key."""
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json must hold a JSON object, not a {type(hf).__name__}")
    model_type = hf.get("model_type")
    archs = hf.get("architectures")
    if archs is not None and not (isinstance(archs, list)
                                  and all(isinstance(a, str) for a in archs)):
        raise ConfigError("config.json: 'architectures' must be a list of names")
    if model_type is None:
        named = f" (architectures {', '.join(archs)})" if archs else ""
        raise ConfigError(f"config.json has no 'model_type'{named}; anecy reads model_type "
                          f"{' or '.join(repr(t) for t in ARCHITECTURES)}")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        what = archs[0] if archs else model_type
        raise ConfigError(f"unsupported architecture {what!r}; anecy reads "
                          f"{', '.join(ARCHITECTURES.values())}")
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key) is not None and not isinstance(hf[key], dict):
            raise ConfigError(f"config.json: {key!r} must be an object")
    for key in ("hidden_act", "rope_type"):
        if key in hf and not isinstance(hf[key], str):
            raise ConfigError(f"config.json: {key!r} must be a string")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r} (anecy trains SwiGLU)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("attention or MLP biases are not supported")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = (rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
                 or "default")
    if rope_type != "default":
        raise ConfigError(f"unsupported RoPE scaling {rope_type!r}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    for key in _INT_KEYS:
        if key not in hf:
            raise ConfigError(f"config.json lacks {key!r}")
    for key in _INT_KEYS + _OPTIONAL_INT_KEYS:
        value = hf.get(key)
        if (key in hf and value is not None) and not (_is_int(value) and value > 0):
            raise ConfigError(f"config.json: {key!r} must be a positive integer, got {value!r}")
    for key, value in (("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)), ("rope_theta", theta)):
        if not _is_number(value):
            raise ConfigError(f"config.json: {key!r} must be a number, got {value!r}")
    tie = hf.get("tie_word_embeddings", model_type == "qwen3")
    if not isinstance(tie, bool):
        raise ConfigError(f"config.json: 'tie_word_embeddings' must be true or false, "
                          f"got {tie!r}")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        vocab_size=hf["vocab_size"], seq_len=seq_len,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
        rope_style="half", qk_norm=model_type == "qwen3", tie_embeddings=tie)


def config_to_hf(cfg: ModelConfig) -> dict:
    """config.json contents for a ModelConfig (Qwen3 when it has QK-norm, else Llama)."""
    if cfg.residual_scale != 1.0:
        raise ConfigError("HF models have no residual scale; this model uses "
                          f"residual_scale={cfg.residual_scale}")
    model_type = "qwen3" if cfg.qk_norm else "llama"
    return {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type,
        "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": max(cfg.seq_len, 2048),
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "dtype": "float32",
    }


# -- safetensors ---------------------------------------------------------------------------
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


def _read_safetensors_header(path: Path):
    """(tensors, data start, data length): the header of a safetensors file, validated
    against the file, so that every tensor lies inside the data section, none overlaps
    another, and each one's size is its dtype's size times its shape's product."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
            n = int.from_bytes(f.read(8), "little")
            if n < 2 or n > min(_MAX_HEADER, size - 8):
                raise CheckpointError(f"{path}: not a safetensors file (header length {n}, "
                                      f"file {size} bytes)")
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory") from None
    except OSError as e:
        raise cannot_read(path, e, kind=CheckpointError) from None
    try:
        header = jsonio.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    if not isinstance(header.pop("__metadata__", {}), dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an "
                              "object)")
    base, data_len = 8 + n, size - 8 - n
    spans = []
    for name, info in header.items():
        def bad(why, name=name):
            return CheckpointError(f"{path}: tensor {name!r}: {why}")
        if not isinstance(info, dict):
            raise bad("its entry is not a JSON object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise bad(f"unsupported dtype {dtype!r} (anecy reads {', '.join(_DTYPES)})")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise bad(f"shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(_is_int(o) for o in offsets)):
            raise bad(f"data_offsets {offsets!r} is not a pair of integers")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise bad(f"data_offsets {offsets!r} are not an ordered pair of offsets")
        if end > data_len:
            raise bad(f"ends at byte {end} of a data section of {data_len} bytes "
                      "(file truncated or header malformed)")
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * _DTYPES[dtype].itemsize:
            raise bad(f"{end - begin} bytes do not hold {dtype} x {shape}")
        spans.append((begin, end, name))
    spans.sort()
    at = 0
    for begin, end, name in spans:
        if begin < at:
            raise CheckpointError(f"{path}: tensor {name!r} overlaps the tensor before it")
        at = end
    return header, base, data_len


def _data_section(path: Path, base: int, length: int):
    """The data section of a safetensors file, mapped read-only (bytes [base, base+length))."""
    if length == 0:
        return np.empty(0, np.uint8)
    return np.memmap(path, dtype=np.uint8, mode="r", offset=base, shape=(length,))


def read_safetensors(path, names=None) -> dict:
    """{name: float32 array} of a safetensors file (F32, F16, BF16 or F64 tensors)."""
    path = Path(path)
    header, base, length = _read_safetensors_header(path)
    data = _data_section(path, base, length)
    out = {}
    for name, info in header.items():
        if names is not None and name not in names:
            continue
        dtype = _DTYPES[info["dtype"]]
        begin, end = info["data_offsets"]
        values = np.frombuffer(data[begin:end], dtype=dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bf16 is the top half of an fp32
            out[name] = (values.astype(np.uint32) << 16).view(np.float32)
        else:
            out[name] = values.astype(np.float32)
    return out


def write_safetensors(path, tensors: dict):
    """Write {name: array} as float32 safetensors (atomically)."""
    header, offset = {}, 0
    for name, value in tensors.items():
        n = value.size * 4
        header[name] = {"dtype": "F32", "shape": list(value.shape),
                        "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with atomic_write(path) as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for value in tensors.values():
            f.write(np.ascontiguousarray(value, dtype="<f4").tobytes())


# -- directories ---------------------------------------------------------------------------
def read_config(path) -> dict:
    """The config.json of an HF directory, as a dict (a JSON object is required)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json (not an HF model directory)")
    try:
        cfg = jsonio.loads(cfg_file.read_bytes())
    except ValueError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    except OSError as e:
        raise cannot_read(cfg_file, e, kind=CheckpointError) from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{cfg_file}: must hold a JSON object, not a "
                              f"{type(cfg).__name__}")
    return cfg


def read_model_config(path, seq_len: int = 256) -> ModelConfig:
    """The ModelConfig of an HF directory; errors name its config.json."""
    try:
        return config_from_hf(read_config(path), seq_len=seq_len)
    except ConfigError as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: {e}") from None


def _shard_map(index: Path) -> dict:
    try:
        doc = jsonio.loads(index.read_bytes())
    except OSError as e:
        raise CheckpointError(f"{index}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise CheckpointError(f"{index}: malformed shard index (not JSON: {e})") from None
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(s, str) and s and Path(s).name == s and s not in (".", "..")
            for s in weight_map.values()):
        raise CheckpointError(f"{index}: malformed shard index (weight_map must map tensor "
                              "names to shard files in the same directory)")
    return weight_map


def load_state_dict(path) -> dict:
    """{name: float32 array} of every tensor of an HF directory (single file or shards)."""
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        weight_map = _shard_map(index)
        out = {}
        for shard in sorted(set(weight_map.values())):
            out.update(read_safetensors(path / shard,
                                        {n for n, s in weight_map.items() if s == shard}))
        missing = set(weight_map) - set(out)
        if missing:
            raise CheckpointError(f"{path}: shards lack {sorted(missing)[0]}")
        return out
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def load_pretrained(path, backend: str = "cpu", seq_len: int = 256, **model_kwargs) -> Model:
    """A Model holding the weights of a local HF directory (Llama or Qwen3)."""
    model = Model(read_model_config(path, seq_len=seq_len), backend=backend, **model_kwargs)
    load_into(model, path)
    return model


def load_into(model: Model, path):
    """Load an HF directory's weights into an existing Model of the same shape. Everything
    is read and checked before the first weight is written: a refused load leaves the
    model as it was."""
    theirs = read_model_config(path, seq_len=model.config.seq_len)
    model.config.require_same(theirs, path, ModelConfig.WEIGHT_FIELDS)
    try:
        model.load_hf_state_dict(load_state_dict(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def save_pretrained(model: Model, path):
    """Write config.json and model.safetensors that transformers' from_pretrained loads."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from .errors import OutputError
        raise OutputError(f"cannot make the directory {path}: {e.strerror or e}") from None
    config = config_to_hf(model.config)
    write_safetensors(path / "model.safetensors", model.hf_state_dict())
    with atomic_write(path / "config.json") as f:
        f.write((json.dumps(config, indent=2) + "\n").encode())
