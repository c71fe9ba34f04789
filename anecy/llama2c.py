"""llama2.c checkpoints (``.bin``): read one into a Model, write a Model as one.

Both of llama2.c's fp32 formats are understood; all numbers are little-endian.

Version 0 (the legacy format, the one ``run.c`` reads): seven int32, ``dim, hidden_dim,
n_layers, n_heads, n_kv_heads, vocab_size, seq_len``, with ``vocab_size`` negative when the
classifier is not tied to the embedding. Then fp32 tensors, each kind for every layer in turn:
embedding, attention norms, wq, wk, wv, wo, FFN norms, w1, w2, w3, the final norm, two RoPE
tables of ``seq_len * head_dim / 2`` values (cos, sin; readers recompute them), and the
classifier when it is not tied.

Version 1: uint32 magic ``0x616b3432`` ("ak42"), int32 version 1, the same seven int32 (vocab
positive), a uint8 "shared classifier" flag, zeros up to byte 256; then the norms first
(attention norms, FFN norms, final norm), the embedding, wq, wk, wv, wo, w1, w2, w3 for every
layer, and the classifier when not shared.

llama2.c models are Llama with head_dim = dim / n_heads, RMSNorm eps 1e-5, RoPE theta 10000
on interleaved pairs (2i, 2i+1): a file holds q and k rows in that order, which is anecy's
``rope_style="interleaved"``, so weights go to and from the Model's views unchanged.
"""

import os
import struct
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import CheckpointError, ConfigError, cannot_read
from .fileio import atomic_write
from .model import Model, _is_rope_permuted, _rope_row_perm, param_layout

MAGIC = 0x616B3432                   # "ak42" as a little-endian uint32
VERSIONS = (0, 1)
V1_HEADER_BYTES = 256
NORM_EPS = 1e-5                      # fixed by llama2.c (run.c, model.py), not in the file
ROPE_THETA = 10000.0
_SHAPE = struct.Struct("<7i")        # dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab, seq
_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
# Sizes no real model reaches; a header beyond them is corrupt, not big.
_LIMITS = {"dim": 1 << 16, "hidden_dim": 1 << 18, "n_layers": 1 << 10, "n_heads": 1 << 10,
           "n_kv_heads": 1 << 10, "vocab_size": 1 << 22, "seq_len": 1 << 20}


# -- the header ----------------------------------------------------------------------------
def _config_from_header(path, values, shared: bool) -> ModelConfig:
    h = dict(zip(_FIELDS, values))
    for name in _FIELDS:
        if not 0 < h[name] <= _LIMITS[name]:
            raise CheckpointError(f"{path}: not a llama2.c checkpoint (header {name} = {h[name]})")
    if h["dim"] % h["n_heads"] or h["n_heads"] % h["n_kv_heads"] \
            or (h["dim"] // h["n_heads"]) % 2:
        raise CheckpointError(f"{path}: not a llama2.c checkpoint (dim {h['dim']}, n_heads "
                              f"{h['n_heads']}, n_kv_heads {h['n_kv_heads']} do not fit)")
    try:
        return ModelConfig(**h, norm_eps=NORM_EPS, rope_theta=ROPE_THETA,
                           rope_style="interleaved", qk_norm=False, tie_embeddings=shared)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def _read_header(f, path):
    """(config, version, bytes before the first weight) of an open checkpoint."""
    head = f.read(V1_HEADER_BYTES)
    if len(head) >= 4 and struct.unpack_from("<I", head)[0] == MAGIC:
        if len(head) < V1_HEADER_BYTES:
            raise CheckpointError(f"{path}: truncated ({len(head)} bytes, inside the header)")
        version = struct.unpack_from("<i", head, 4)[0]
        if version != 1:
            what = " (int8-quantised, not read by anecy)" if version == 2 else ""
            raise CheckpointError(f"{path}: llama2.c format version {version}{what}; anecy "
                                  "reads versions 0 and 1")
        values = _SHAPE.unpack_from(head, 8)
        flag = head[8 + _SHAPE.size]
        if flag not in (0, 1):
            raise CheckpointError(f"{path}: corrupt header (shared-classifier flag {flag})")
        return _config_from_header(path, values, bool(flag)), 1, V1_HEADER_BYTES
    if len(head) < _SHAPE.size:
        raise CheckpointError(f"{path}: not a llama2.c checkpoint ({len(head)} bytes, "
                              "shorter than a header)")
    values = list(_SHAPE.unpack_from(head))
    shared = values[5] > 0
    values[5] = abs(values[5])
    return _config_from_header(path, values, shared), 0, _SHAPE.size


def _open(path):
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a llama2.c checkpoint")
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise cannot_read(path, e, kind=CheckpointError) from None


def read_config(path, seq_len=None):
    """(ModelConfig, format version) from a checkpoint's header, without reading weights.
    ``seq_len`` replaces the file's context length (the training window, say)."""
    with _open(path) as f:
        try:
            cfg, version, _ = _read_header(f, path)
        except OSError as e:
            raise cannot_read(path, e, kind=CheckpointError) from None
    if seq_len is not None:
        cfg.seq_len = seq_len
        cfg.validate()
    return cfg, version


# -- the tensor order ----------------------------------------------------------------------
def _layout(cfg: ModelConfig, version: int):
    """[(Model view name, or None for the RoPE tables), float count] in file order; the RoPE
    tables of version 0 span cfg.seq_len positions (the file's context length)."""
    L, hd = cfg.n_layers, cfg.head_dim

    def each(suffix):
        return [(f"model.layers.{l}.{suffix}", None) for l in range(L)]

    attn_norms, ffn_norms = each("input_layernorm.weight"), each("post_attention_layernorm.weight")
    mats = (each("self_attn.q_proj.weight") + each("self_attn.k_proj.weight")
            + each("self_attn.v_proj.weight") + each("self_attn.o_proj.weight"))
    ffn = (each("mlp.gate_proj.weight") + each("mlp.down_proj.weight")
           + each("mlp.up_proj.weight"))
    emb, final = [("model.embed_tokens.weight", None)], [("model.norm.weight", None)]
    cls = [] if cfg.tie_embeddings else [("lm_head.weight", None)]
    if version == 0:
        rope = [(None, cfg.seq_len * hd // 2)] * 2
        order = emb + attn_norms + mats + ffn_norms + ffn + final + rope + cls
    else:
        order = attn_norms + ffn_norms + final + emb + mats + ffn + cls
    sizes = {name: int(np.prod(shape)) for name, shape, _ in param_layout(cfg)}
    return [(name, sizes[name] if name else n) for name, n in order]


# -- reading -------------------------------------------------------------------------------
def load(path, backend: str = "cpu", seq_len=None, **model_kwargs) -> Model:
    """A Model holding a llama2.c checkpoint (version 0 or 1), shaped by its header.
    ``seq_len`` (default: the file's) is the Model's sequence length."""
    cfg, _ = read_config(path, seq_len=seq_len)
    model = Model(cfg, backend=backend, **model_kwargs)
    load_into(model, path)
    return model


def load_into(model: Model, path):
    """Read a checkpoint's weights into a Model of the same shape (the sequence length may
    differ: RoPE tables are not weights)."""
    path = Path(path)
    ours = model.config
    with _open(path) as f:
        try:
            theirs, version, start = _read_header(f, path)
            if ours.rope_style != "interleaved" or ours.qk_norm or ours.residual_scale != 1.0:
                raise CheckpointError(f"{path}: a llama2.c model cannot load into this model "
                                      "(it needs interleaved RoPE, no QK-norm, no residual "
                                      "scale)")
            ours.require_same(theirs, path, ModelConfig.WEIGHT_FIELDS)
            layout = _layout(theirs, version)
            expected = start + 4 * sum(n for _, n in layout)
            size = os.fstat(f.fileno()).st_size
            if size != expected:
                shape = ", ".join(f"{k} {getattr(theirs, k)}" for k in _FIELDS)
                raise CheckpointError(f"{path}: {size} bytes, but its header ({shape}, "
                                      f"version {version}) needs {expected}")
            # read into a staging buffer: a file refused half-way leaves the model as it was
            staged = np.empty_like(model.params)
            f.seek(start)
            for name, n in layout:
                if name is None:
                    f.seek(4 * n, os.SEEK_CUR)
                    continue
                lo, hi = model.offsets[name]
                _read_exact(f, memoryview(staged[lo:hi].view(np.uint8)), path)
        except OSError as e:
            raise cannot_read(path, e, kind=CheckpointError) from None
    if not _all_finite(staged):
        raise CheckpointError(f"{path}: holds NaN or infinite weights")
    model.params[...] = staged
    model.weights_changed()


def _read_exact(f, buf: memoryview, path):
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            raise CheckpointError(f"{path}: truncated (the file shrank while reading)")
        got += n


def _all_finite(a, chunk=1 << 22) -> bool:
    return all(np.isfinite(a[i:i + chunk]).all() for i in range(0, a.size, chunk))


# -- writing -------------------------------------------------------------------------------
def check_exportable(cfg: ModelConfig):
    """Raise ConfigError unless llama2.c's format can hold a model of this shape."""
    why = []
    if cfg.qk_norm:
        why.append("it has QK-norm (Qwen3)")
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        why.append(f"head_dim {cfg.head_dim} is not dim / n_heads")
    if cfg.norm_eps != NORM_EPS:
        why.append(f"norm_eps is {cfg.norm_eps:g}, llama2.c's is fixed at {NORM_EPS:g}")
    if cfg.rope_theta != ROPE_THETA:
        why.append(f"rope_theta is {cfg.rope_theta:g}, llama2.c's is fixed at {ROPE_THETA:g}")
    if cfg.residual_scale != 1.0:
        why.append(f"residual_scale is {cfg.residual_scale:g}")
    if why:
        raise ConfigError("the llama2.c format cannot hold this model: " + "; ".join(why))


def _interleaved_views(model: Model) -> dict:
    """The Model's weights with q/k rows in interleaved RoPE order (llama2.c's)."""
    if model.config.rope_style == "interleaved":
        return model.views
    hd = model.config.head_dim
    out = dict(model.views)
    for name, view in model.views.items():
        if _is_rope_permuted(name):   # half-split rows -> interleaved rows, head by head
            rows = view.shape[0]
            perm = (np.arange(rows // hd)[:, None] * hd + _rope_row_perm(hd)[None, :]).reshape(-1)
            out[name] = view[perm]
    return out


def _rope_tables(head_dim: int, seq_len: int):
    """llama2.c's freqs_cos and freqs_sin [seq_len, head_dim/2], kept in version 0 files."""
    inv = 1.0 / (np.float32(ROPE_THETA) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                           / np.float32(head_dim)))
    angles = np.outer(np.arange(seq_len, dtype=np.float32), inv.astype(np.float32))
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def save(model: Model, path, version: int = 0, seq_len=None):
    """Write a Model as a llama2.c checkpoint (version 0, what run.c reads, or 1),
    atomically. ``seq_len`` is the context length the header records (default: the
    Model's)."""
    if version not in VERSIONS:
        raise ConfigError(f"llama2.c format version must be 0 or 1, got {version!r}")
    check_exportable(model.config)
    cfg = model.config
    if seq_len is not None:
        cfg = ModelConfig.from_dict(dict(cfg.to_dict(), seq_len=seq_len))
    shape = [cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads,
             cfg.vocab_size, cfg.seq_len]
    if version == 0:
        if not cfg.tie_embeddings:
            shape[5] = -shape[5]
        header = _SHAPE.pack(*shape)
    else:
        header = struct.pack("<Ii", MAGIC, 1) + _SHAPE.pack(*shape) \
            + struct.pack("<B", int(cfg.tie_embeddings))
        header += bytes(V1_HEADER_BYTES - len(header))
    views = _interleaved_views(model)
    rope = iter(_rope_tables(cfg.head_dim, cfg.seq_len))
    path = Path(path)
    try:
        with atomic_write(path) as f:
            f.write(header)
            for name, _ in _layout(cfg, version):
                a = next(rope) if name is None else views[name]
                f.write(memoryview(np.ascontiguousarray(a, dtype="<f4").reshape(-1)))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot write: {e.strerror or e}") from None
    return path
