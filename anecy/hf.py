"""Hugging Face model directories: read one into a Model, write a Model as one.

A directory holds ``config.json`` and either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. Llama (``LlamaForCausalLM``) and Qwen3
(``Qwen3ForCausalLM``) configurations are understood. The safetensors format (an
8-byte header length, a JSON header, raw little-endian tensors) is read and written
here directly, so bf16 checkpoints (numpy has no bf16) load without PyTorch."""

import json
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write
from .model import Model

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
           "F64": np.dtype("<f8")}


# -- configuration -------------------------------------------------------------------------
def config_from_hf(hf: dict, seq_len: int = 256) -> ModelConfig:
    """ModelConfig of an HF config.json dict (training sequence length `seq_len`)."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        archs = hf.get("architectures") or [model_type]
        raise ConfigError(f"unsupported architecture {archs[0]!r}; anecy reads "
                          f"{', '.join(ARCHITECTURES.values())}")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {hf['hidden_act']!r} (anecy trains SwiGLU)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ConfigError("attention or MLP biases are not supported")
    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise ConfigError(f"unsupported RoPE scaling {rope_type!r}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    try:
        heads = hf["num_attention_heads"]
        return ModelConfig(
            dim=hf["hidden_size"], hidden_dim=hf["intermediate_size"],
            n_layers=hf["num_hidden_layers"], n_heads=heads,
            n_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            vocab_size=hf["vocab_size"], seq_len=seq_len,
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)), rope_theta=float(theta),
            rope_style="half", qk_norm=model_type == "qwen3",
            tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "qwen3")))
    except KeyError as e:
        raise ConfigError(f"config.json lacks {e.args[0]!r}") from None


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
def _read_safetensors_header(path: Path):
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > 100 << 20:
                raise CheckpointError(f"{path}: not a safetensors file")
            header = json.loads(f.read(size))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def read_safetensors(path, names=None) -> dict:
    """{name: float32 array} of a safetensors file (F32, F16 or BF16 tensors)."""
    path = Path(path)
    header, base = _read_safetensors_header(path)
    file_size = path.stat().st_size
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if names is not None and name not in names:
            continue
        dtype = _DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name} has unsupported dtype {info.get('dtype')}")
        start, end = (base + o for o in info["data_offsets"])
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end > file_size or end - start != count * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {name} is truncated or malformed")
        data = raw[start:end].view(dtype).reshape(info["shape"])
        if info["dtype"] == "BF16":  # bf16 is the top half of an fp32
            out[name] = (data.astype(np.uint32) << 16).view(np.float32)
        else:
            out[name] = data.astype(np.float32)
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
    path = Path(path)
    cfg_file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    if not cfg_file.exists():
        raise CheckpointError(f"{path}: no config.json (not an HF model directory)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e.msg})") from None


def load_state_dict(path) -> dict:
    """{name: float32 array} of every tensor of an HF directory (single file or shards)."""
    path = Path(path)
    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.exists():
        return read_safetensors(single)
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise CheckpointError(f"{index}: malformed shard index") from None
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
    cfg = config_from_hf(read_config(path), seq_len=seq_len)
    model = Model(cfg, backend=backend, **model_kwargs)
    load_into(model, path)
    return model


def load_into(model: Model, path):
    """Load an HF directory's weights into an existing Model of the same shape."""
    theirs = config_from_hf(read_config(path), seq_len=model.config.seq_len)
    ours = model.config
    diff = [f for f in ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                        "vocab_size", "qk_norm", "tie_embeddings", "rope_theta", "norm_eps") if getattr(theirs, f) != getattr(ours, f)]
    if diff:
        raise CheckpointError(f"{path} holds another model (differs in {', '.join(diff)})")
    try:
        model.load_hf_state_dict(load_state_dict(path))
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def save_pretrained(model: Model, path):
    """Write config.json and model.safetensors that transformers' from_pretrained loads."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config_to_hf(model.config)
    write_safetensors(path / "model.safetensors", model.hf_state_dict())
    with atomic_write(path / "config.json") as f:
        f.write((json.dumps(config, indent=2) + "\n").encode())
