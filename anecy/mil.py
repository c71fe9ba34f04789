"""MIL programs for the ten ANE kernels, the table of their input and output layouts,
and the blob format of their constants.

Every kernel takes ONE fp16 input ``[1, C, 1, W]`` in which activations and weights sit
side by side along the spatial axis (docs/ARCHITECTURE.md, section 4), so a program never
has to be recompiled when the weights change: each layer owns an input buffer whose weight
columns are staged once per optimizer update and whose activation columns are rewritten
every microstep.  ``KERNELS`` below is the only place where those layouts are written down; the
program generators, the packing helpers used by the ``sim`` and ``ane`` backends, and the
tests all read it.

Conventions shared by every generator:

* CPU-side activations are channel-first ``[C, S]``; weights are in HF orientation
  ``W[out, in]``.
* Inside the programs the attention works per head in the channel-first layout
  ``[1, heads, head_dim, S]`` (a free reshape of ``[1, heads*head_dim, 1, S]``), so the
  score and value products are single batched matmuls with no transposes.
* The weight products keep the pattern the public reference measured on hardware:
  activation ``[1,1,S,C]`` times weight block ``[1,1,C,O]`` then one transpose back (the
  one exception, ffnFused's down projection, has W2 staged as is and needs no transpose).
* GQA follows HF ``repeat_kv``: query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``.
* Constants (causal mask, RoPE tables) are BLOBFILE constants: ``MilProgram.blobs`` maps the
  ``@model_path/weights/...`` path of each to its bytes (header + fp16 payload).

QK-norm (Qwen3): its two weight vectors [head_dim] are dynamic like every other weight, so
sdpaFwd's input gains columns after ``xnorm | Wq^T | Wk^T | Wv^T``: ``q_norm`` and ``k_norm``,
NW columns each (NW = 1 whenever head_dim <= dim, as in every real model: value i of the
vector at row i, the other rows zero; otherwise value i at row i // NW, column i % NW), then
zero columns up to a multiple of 32.  The norm is applied per head before RoPE, and the
output gains ``q_pre`` and ``k_pre`` (the projections before the norm), from which the CPU
computes the norm's backward.
"""

from __future__ import annotations

import re
import struct
from dataclasses import astuple, dataclass

import numpy as np

from . import _ops

__all__ = [
    "Block", "Out", "Kernel", "KERNELS", "KERNEL_NAMES", "Placed", "Layout", "layout",
    "input_shape", "output_shape", "column_offsets", "input_channel_offsets",
    "output_offsets", "new_input_buffer", "stage_weights", "write_activations",
    "pack_input", "unpack_output", "MilProgram", "GENERATORS", "generate", "build_blob",
    "read_blob", "BLOB_HEADER_BYTES", "BLOB_DESCRIPTOR_OFFSET", "MASK_VALUE", "rope_tables",
    "causal_mask",
]  # + the ten gen_<kernel> functions, added after GENERATORS


# =========================================================================================
# The layout table
# =========================================================================================

@dataclass(frozen=True)
class Block:
    """One block of a kernel's input.

    For a kernel packed along ``columns`` the block spans all C rows and ``size`` columns;
    for one packed along ``channels`` it spans ``size`` rows and all S columns.

    ``kind``: ``"weight"`` (staged once per optimizer update), ``"act"`` (written every
    microstep) or ``"pad"`` (always zero).
    ``place`` says how the CPU array maps onto the block:
      ``"as_is"``  block[r, c] = array[r, c]        (array shape = block shape)
      ``"T"``      block[r, c] = array[c, r]        (an HF weight whose transpose is staged)
      ``"vec"``    a vector of head_dim values folded into the block's first rows:
                   value i sits at row i // NW, column i % NW; the other rows are zero.
    ``when``: ``""`` always present, ``"qk_norm"`` only when ``cfg.qk_norm``.
    """
    name: str
    size: str
    kind: str
    holds: str
    place: str = "as_is"
    when: str = ""


@dataclass(frozen=True)
class Out:
    """One channel block of a kernel's output ``[1, C', 1, S]``."""
    name: str
    size: str
    holds: str
    when: str = ""


@dataclass(frozen=True)
class Kernel:
    name: str
    doc: str
    channels: str          # input C, as a size expression
    packing: str           # "columns" (blocks side by side along W) or "channels"
    inputs: tuple[Block, ...]
    outputs: tuple[Out, ...]


# Size expressions use these symbols (see _symbols):
#   D dim, H hidden_dim, Q n_heads*head_dim, K n_kv_heads*head_dim, S seq_len,
#   P n_heads*seq_len, HD head_dim, NW columns of a QK-norm weight block (1 when
#   head_dim <= dim), NPAD zero columns that round the QK-norm section up to 32 columns.
_W, _A, _PAD = "weight", "act", "pad"


def _input_gradient(name, out, channels, out_size, *terms) -> Kernel:
    """A backward kernel ``out = sum of W^T @ dy`` over terms (dy, what dy holds, W, W's
    rows): every gradient block (S columns), then every weight as is (row r = W[r, :])."""
    formula = " + ".join(f"{w}^T @ {dy}" for dy, _, w, _ in terms)
    grads = tuple(Block(dy, "S", _A, holds) for dy, holds, _, _ in terms)
    weights = tuple(Block(w, size, _W, f"{w} as is: row r holds {w}[r, :]")
                    for _, _, w, size in terms)
    return Kernel(name, f"{out} = {formula}.", channels, "columns", grads + weights,
                  (Out(out, out_size, formula),))


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Kernel("sdpaFwd",
           "QKV projections, optional QK-norm, RoPE, causal GQA attention (no Wo).",
           "D", "columns",
           (Block("xnorm", "S", _A, "RMSNorm'd layer input [D, S]"),
            Block("Wq", "Q", _W, "Wq^T: row c holds Wq[:, c]", "T"),
            Block("Wk", "K", _W, "Wk^T: row c holds Wk[:, c]", "T"),
            Block("Wv", "K", _W, "Wv^T: row c holds Wv[:, c]", "T"),
            # QK-norm weights go after the columns every model has, so that those keep
            # their offsets whether or not the model has QK-norm.
            Block("q_norm", "NW", _W, "q_norm weight [head_dim], folded", "vec", "qk_norm"),
            Block("k_norm", "NW", _W, "k_norm weight [head_dim], folded", "vec", "qk_norm"),
            # Keeps every row of the surface a multiple of 64 bytes whenever the other
            # columns are (stride alignment of odd widths is unverified on hardware).
            Block("qk_pad", "NPAD", _PAD, "zeros", "as_is", "qk_norm")),
           (Out("attn", "Q", "attention output, head h in rows h*head_dim.."),
            Out("q_rope", "Q", "q after QK-norm and RoPE"),
            Out("k_rope", "K", "k after QK-norm and RoPE"),
            Out("v", "K", "v = Wv @ xnorm"),
            Out("q_pre", "Q", "q = Wq @ xnorm before QK-norm (for its backward)", "qk_norm"),
            Out("k_pre", "K", "k = Wk @ xnorm before QK-norm (for its backward)", "qk_norm"))),
    Kernel("woFwd", "Output projection o = Wo @ attn.", "Q", "columns",
           (Block("attn", "S", _A, "attention output [Q, S]"),
            Block("Wo", "D", _W, "Wo^T: row c holds Wo[:, c]", "T")),
           (Out("o", "D", "Wo @ attn"),)),
    Kernel("ffnFused", "SwiGLU FFN with the residual add.", "D", "columns",
           (Block("x2norm", "S", _A, "RMSNorm'd FFN input [D, S]"),
            Block("x2", "S", _A, "residual stream [D, S]"),
            Block("W1", "H", _W, "W1^T (gate): row c holds W1[:, c]", "T"),
            Block("W3", "H", _W, "W3^T (up): row c holds W3[:, c]", "T"),
            Block("W2", "H", _W, "W2 (down) as is: row d holds W2[d, :]")),
           (Out("x_next", "D", "x2 + residual_scale * W2 @ gate"),
            Out("h1", "H", "W1 @ x2norm"),
            Out("h3", "H", "W3 @ x2norm"),
            Out("gate", "H", "silu(h1) * h3"))),
    _input_gradient("ffnBwdW2t", "dgate", "D", "H",
                    ("dffn", "gradient of the FFN output [D, S]", "W2", "H")),
    _input_gradient("ffnBwdW13t", "dx", "H", "D", ("dh1", "gradient of h1 [H, S]", "W1", "D"),
                    ("dh3", "gradient of h3 [H, S]", "W3", "D")),
    _input_gradient("wotBwd", "da", "D", "Q", ("dy", "gradient of o [D, S]", "Wo", "Q")),
    Kernel("sdpaBwd1", "Recomputed attention probabilities, dV and dP.", "4*Q", "channels",
           (Block("q", "Q", _A, "q after RoPE [Q, S]"),
            Block("k_rep", "Q", _A, "k after RoPE, repeated to Q (HF head mapping)"),
            Block("v_rep", "Q", _A, "v repeated to Q (HF head mapping)"),
            Block("da", "Q", _A, "gradient of attn [Q, S]")),
           # probs and dprobs come first, at the rows sdpaBwd2's input holds them, so that
           # one Surface can be this kernel's output and sdpaBwd2's input (no copy)
           (Out("probs", "P", "probs[h*S + i, j]: softmax prob of query i on key j, head h"),
            Out("dprobs", "P", "dprobs[h*S + i, j] = sum_c da[h*hd+c, i] * v_rep[h*hd+c, j]"),
            Out("dv_rep", "Q", "dv per query head: sum_i probs_h[i, j] * da[h*hd+c, i]"))),
    Kernel("sdpaBwd2", "Softmax backward and dQ, dK.", "2*P+2*Q", "channels",
           (Block("probs", "P", _A, "probs from sdpaBwd1 [P, S]"),
            Block("dprobs", "P", _A, "dprobs from sdpaBwd1 [P, S]"),
            Block("q", "Q", _A, "q after RoPE [Q, S]"),
            Block("k_rep", "Q", _A, "k after RoPE, repeated to Q")),
           (Out("dq", "Q", "gradient of q (after RoPE)"),
            Out("dk_rep", "Q", "gradient of k_rep (reduce over each kv group on the CPU)"))),
    _input_gradient("qBwd", "dx", "Q", "D",
                    ("dq", "gradient of q before RoPE/QK-norm [Q, S]", "Wq", "D")),
    _input_gradient("kvBwd", "dx", "K", "D",
                    ("dk", "gradient of k before RoPE/QK-norm [K, S]", "Wk", "D"),
                    ("dv", "gradient of v [K, S]", "Wv", "D")),
)}

KERNEL_NAMES = tuple(KERNELS)

# QK-norm blocks pad to this many columns (64 bytes of fp16).
_ALIGN_COLS = 32


def _norm_cols(cfg) -> int:
    """Columns of a folded QK-norm weight: the smallest divisor of head_dim that lets
    head_dim / NW rows fit in the D input rows (1 for every real model)."""
    hd = cfg.head_dim
    for k in range(1, hd + 1):
        if hd % k == 0 and hd // k <= cfg.dim:
            return k
    return hd  # unreachable: k = hd always fits


def _symbols(cfg) -> dict[str, int]:
    nw = _norm_cols(cfg)
    return dict(D=cfg.dim, H=cfg.hidden_dim, Q=cfg.q_dim, K=cfg.kv_dim, S=cfg.seq_len,
                P=cfg.n_heads * cfg.seq_len, HD=cfg.head_dim, NW=nw,
                NPAD=(-2 * nw) % _ALIGN_COLS)


_SIZE_EXPR = re.compile(r"^[A-Z0-9+* ]+$")


def _size(expr: str, syms: dict[str, int]) -> int:
    if not _SIZE_EXPR.match(expr):
        raise ValueError(f"bad size expression {expr!r}")
    return int(eval(expr, {"__builtins__": {}}, syms))  # noqa: S307 - vetted by the regex


def _present(when: str, cfg) -> bool:
    if when == "":
        return True
    if when == "qk_norm":
        return bool(cfg.qk_norm)
    raise ValueError(f"unknown condition {when!r}")


@dataclass(frozen=True)
class Placed:
    """A Block resolved for one config: the rectangle it occupies in the [C, W] input."""
    name: str
    kind: str
    place: str
    holds: str
    row0: int
    rows: int
    col0: int
    cols: int

    @property
    def array_shape(self) -> tuple[int, ...]:
        """Shape of the CPU array the block is packed from."""
        if self.place == "T":
            return (self.cols, self.rows)
        if self.place == "vec":
            return (self.rows * self.cols,)
        return (self.rows, self.cols)


@dataclass(frozen=True)
class Layout:
    kernel: str
    in_shape: tuple[int, int, int, int]
    inputs: tuple[Placed, ...]
    out_shape: tuple[int, int, int, int]
    outputs: tuple[tuple[str, int, int], ...]   # (name, channel offset, channels)

    def block(self, name: str) -> Placed:
        for b in self.inputs:
            if b.name == name:
                return b
        raise KeyError(f"kernel {self.kernel} has no input block {name!r}")


def _cfg_key(cfg):
    return astuple(cfg)


_LAYOUTS: dict[tuple, Layout] = {}


def layout(kernel: str, cfg) -> Layout:
    """Resolve ``KERNELS[kernel]`` for ``cfg``: every block's rectangle, the input shape,
    the output shape and the output channel offsets."""
    if kernel not in KERNELS:
        raise KeyError(f"unknown kernel {kernel!r}; known: {', '.join(KERNEL_NAMES)}")
    key = (kernel, _cfg_key(cfg))
    hit = _LAYOUTS.get(key)
    if hit is not None:
        return hit
    spec = KERNELS[kernel]
    syms = _symbols(cfg)
    C = _size(spec.channels, syms)
    S = syms["S"]
    placed = []
    pos = 0
    for b in spec.inputs:
        if not _present(b.when, cfg):
            continue
        n = _size(b.size, syms)
        if n == 0:
            continue
        if spec.packing == "columns":
            rows = syms["HD"] // n if b.place == "vec" else C
            placed.append(Placed(b.name, b.kind, b.place, b.holds, 0, rows, pos, n))
        else:
            placed.append(Placed(b.name, b.kind, b.place, b.holds, pos, n, 0, S))
        pos += n
    if spec.packing == "columns":
        W = pos
    else:
        W = S
        if pos != C:
            raise AssertionError(f"{kernel}: channel blocks sum to {pos}, table says C={C}")
    outs = []
    off = 0
    for o in spec.outputs:
        if not _present(o.when, cfg):
            continue
        n = _size(o.size, syms)
        outs.append((o.name, off, n))
        off += n
    lay = Layout(kernel, (1, C, 1, W), tuple(placed), (1, off, 1, S), tuple(outs))
    _LAYOUTS[key] = lay
    return lay


def input_shape(kernel: str, cfg) -> tuple[int, int, int, int]:
    return layout(kernel, cfg).in_shape


def output_shape(kernel: str, cfg) -> tuple[int, int, int, int]:
    return layout(kernel, cfg).out_shape


def column_offsets(kernel: str, cfg) -> dict[str, tuple[int, int]]:
    """name -> (first column, width) of every input block (channel-packed kernels: every
    block spans the S columns)."""
    return {b.name: (b.col0, b.cols) for b in layout(kernel, cfg).inputs}


def input_channel_offsets(kernel: str, cfg) -> dict[str, tuple[int, int]]:
    """name -> (first row, rows) of every input block."""
    return {b.name: (b.row0, b.rows) for b in layout(kernel, cfg).inputs}


def output_offsets(kernel: str, cfg) -> dict[str, tuple[int, int]]:
    """name -> (first channel, channels) of every output block."""
    return {n: (o, c) for n, o, c in layout(kernel, cfg).outputs}


# =========================================================================================
# Packing and unpacking
# =========================================================================================

def new_input_buffer(kernel: str, cfg) -> np.ndarray:
    """A zeroed fp16 [C, W] buffer for ``kernel``'s input."""
    _, C, _, W = input_shape(kernel, cfg)
    return np.zeros((C, W), dtype=np.float16)


def _check_buffer(lay: Layout, buf: np.ndarray) -> np.ndarray:
    _, C, _, W = lay.in_shape
    if not isinstance(buf, np.ndarray) or buf.dtype != np.float16:
        raise ValueError(f"{lay.kernel}: input buffer must be a float16 numpy array")
    if buf.shape == (1, C, 1, W):
        buf = buf.reshape(C, W)
    if buf.shape != (C, W):
        raise ValueError(f"{lay.kernel}: input buffer has shape {buf.shape}, expected {(C, W)}")
    return buf


def _write(lay: Layout, buf: np.ndarray, b: Placed, array) -> None:
    a = np.asarray(array)
    if a.shape != b.array_shape:
        raise ValueError(f"{lay.kernel}: {b.name} has shape {a.shape}, expected {b.array_shape}")
    if b.place == "T":
        a = a.T
    elif b.place == "vec":
        # the whole column block is owned by the vector: clear rows it does not use
        buf[:, b.col0:b.col0 + b.cols] = 0
        a = a.reshape(b.rows, b.cols)
    buf[b.row0:b.row0 + b.rows, b.col0:b.col0 + b.cols] = a.astype(np.float16)


def _write_kind(kernel, cfg, buf, arrays, kind):
    lay = layout(kernel, cfg)
    buf = _check_buffer(lay, buf)
    wanted = [b for b in lay.inputs if b.kind == kind]
    names = {b.name for b in wanted}
    unknown = sorted(set(arrays) - names)
    missing = sorted(names - set(arrays))
    if unknown or missing:
        raise ValueError(f"{kernel}: {kind} blocks are {sorted(names)}; "
                         f"missing {missing}, unexpected {unknown}")
    for b in wanted:
        _write(lay, buf, b, arrays[b.name])
    return lay, buf


def stage_weights(kernel: str, cfg, buf: np.ndarray, **weights) -> None:
    """Write every weight block (and zero every pad block) of ``kernel``'s input: done once
    per optimizer update on each layer's own buffer."""
    lay, buf = _write_kind(kernel, cfg, buf, weights, _W)
    for b in lay.inputs:
        if b.kind == _PAD:
            buf[b.row0:b.row0 + b.rows, b.col0:b.col0 + b.cols] = 0


def write_activations(kernel: str, cfg, buf: np.ndarray, **acts) -> None:
    """Write every activation block of ``kernel``'s input: done every microstep."""
    _write_kind(kernel, cfg, buf, acts, _A)


def pack_input(kernel: str, cfg, **arrays) -> np.ndarray:
    """The whole fp16 [C, W] input of ``kernel`` from named CPU arrays (HF-orientation
    weights, channel-first activations)."""
    lay = layout(kernel, cfg)
    weight_names = {b.name for b in lay.inputs if b.kind == _W}
    buf = new_input_buffer(kernel, cfg)
    stage_weights(kernel, cfg, buf, **{k: v for k, v in arrays.items() if k in weight_names})
    write_activations(kernel, cfg, buf,
                      **{k: v for k, v in arrays.items() if k not in weight_names})
    return buf


def unpack_output(kernel: str, cfg, out) -> dict[str, np.ndarray]:
    """Split ``kernel``'s fp16 output ([1, C', 1, S] or [C', S]) into named fp32 [ch, S]."""
    lay = layout(kernel, cfg)
    _, C, _, S = lay.out_shape
    out = np.asarray(out)
    if out.shape == (1, C, 1, S):
        out = out.reshape(C, S)
    if out.shape != (C, S):
        raise ValueError(f"{kernel}: output has shape {out.shape}, expected {(C, S)}")
    return {n: out[o:o + c].astype(np.float32) for n, o, c in lay.outputs}


# =========================================================================================
# Blobs
# =========================================================================================

BLOB_HEADER_BYTES = 128
BLOB_DESCRIPTOR_OFFSET = 64   # the value written in BLOBFILE(..., offset=uint64(64))
_BLOB_MAGIC = b"\xef\xbe\xad\xde"


def build_blob(values) -> bytes:
    """A weight file holding one fp16 tensor: 128-byte header then the fp16 payload.

    Header: byte 0 = 1, byte 4 = 2 (file header); at 64 the chunk descriptor the BLOBFILE
    offset points to: magic DEADBEEF (little-endian), byte 68 = 1, uint32 at 72 = payload
    bytes, uint32 at 80 = payload offset (128)."""
    payload = np.ascontiguousarray(np.asarray(values).astype("<f2").ravel()).tobytes()
    head = bytearray(BLOB_HEADER_BYTES)
    head[0] = 1
    head[4] = 2
    head[64:68] = _BLOB_MAGIC
    head[68] = 1
    struct.pack_into("<I", head, 72, len(payload))
    struct.pack_into("<I", head, 80, BLOB_HEADER_BYTES)
    return bytes(head) + payload


def read_blob(data: bytes, offset: int = BLOB_DESCRIPTOR_OFFSET) -> np.ndarray:
    """The fp16 payload of a blob written by ``build_blob`` (flat), after checking its
    header; raises ValueError saying what is wrong."""
    data = bytes(data)
    if len(data) < BLOB_HEADER_BYTES:
        raise ValueError(f"blob of {len(data)} bytes is shorter than its 128-byte header")
    if data[0] != 1 or data[4] != 2:
        raise ValueError("blob file header is not 1 at byte 0 and 2 at byte 4")
    if offset < 0 or offset + 24 > len(data):
        raise ValueError(f"blob descriptor offset {offset} is outside the blob")
    if data[offset:offset + 4] != _BLOB_MAGIC:
        raise ValueError(f"blob has no DEADBEEF descriptor at offset {offset}")
    if data[offset + 4] != 1:
        raise ValueError("blob descriptor's data type byte is not 1 (fp16)")
    nbytes, = struct.unpack_from("<I", data, offset + 8)
    start, = struct.unpack_from("<I", data, offset + 16)
    if nbytes % 2:
        raise ValueError(f"blob payload of {nbytes} bytes is not whole fp16 values")
    if start < BLOB_HEADER_BYTES or start + nbytes != len(data):
        raise ValueError(f"blob declares {nbytes} payload bytes at {start} but holds "
                         f"{len(data)} bytes in all")
    return np.frombuffer(data, dtype="<f2", count=nbytes // 2, offset=start).astype(np.float16)


# Masked scores get this added: finite, so score + mask never overflows to -inf in fp16 (the
# ANE's handling of -inf inside softmax is unverified), yet exp(MASK_VALUE) is exactly 0.
MASK_VALUE = -30000.0


def causal_mask(S: int) -> np.ndarray:
    """[S, S] fp16: 0 where key j <= query i, MASK_VALUE above the diagonal."""
    m = np.zeros((S, S), dtype=np.float16)
    m[np.triu_indices(S, 1)] = MASK_VALUE
    return m


def rope_tables(cfg) -> tuple[np.ndarray, np.ndarray]:
    """RoPE tables [head_dim, S] in the channel-first per-head layout: the cpu backend's
    tables (``anecy._ops.rope_tables``, [head_dim/2, S]) with each pair's value on both of
    its rows. Row c belongs to pair i = c // 2 (interleaved) or c % (head_dim/2) (half).
    The sine table carries the rotation's sign: -sin on the first row of each pair, +sin on
    the second, so that rotating is ``x*cos + swap(x)*sin``."""
    hd, S = cfg.head_dim, cfg.seq_len
    cos, sin = _ops.rope_tables(hd, S, cfg.rope_theta)
    if cfg.rope_style == "interleaved":
        cos_t = np.repeat(cos, 2, axis=0)
        sin_t = np.stack([-sin, sin], axis=1).reshape(hd, S)
    else:
        cos_t = np.concatenate([cos, cos], axis=0)
        sin_t = np.concatenate([-sin, sin], axis=0)
    return cos_t.astype(np.float16), sin_t.astype(np.float16)


# =========================================================================================
# Program text
# =========================================================================================

@dataclass
class MilProgram:
    """A generated program: MIL text plus the blob files it references."""
    kernel: str
    text: str
    blobs: dict[str, bytes]
    input_shape: tuple[int, int, int, int]
    output_shape: tuple[int, int, int, int]


_BUILD_INFO = ('[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, '
               '{"coremlc-version", "3505.4.1"}, {"coremltools-component-milinternal", ""}, '
               '{"coremltools-version", "9.0"}})]')


def _ttype(shape) -> str:
    return "tensor<fp16, [" + ",".join(str(int(d)) for d in shape) + "]>"


def _fp16_literal(v: float) -> str:
    # shortest positional decimal that reads back as the same fp16 value
    return np.format_float_positional(np.float16(v), unique=True, trim="0")


def _broadcast(a, b):
    return tuple(int(d) for d in np.broadcast_shapes(tuple(a), tuple(b)))


class _Builder:
    """Emits one MIL function, tracking shapes so that each line declares its type.
    Small int/bool constants are emitted once and shared, named after their value."""

    def __init__(self, kernel: str, in_shape):
        self.kernel = kernel
        self.in_shape = tuple(in_shape)
        self.lines = []
        self.shapes = {"x": self.in_shape}    # fp16 tensors (None for fp16 scalars)
        self.taken = {"x"}
        self.blobs: dict[str, bytes] = {}

    def _name(self, name):
        if name in self.taken:
            raise AssertionError(f"{self.kernel}: duplicate MIL name {name!r}")
        self.taken.add(name)
        return name

    def _line(self, decl, name, rhs):
        self.lines.append(f"        {decl} {name} = {rhs}[name=string(\"{name}\")];")

    def _const(self, decl, name, val):
        self.lines.append(f"        {decl} {name} = const()[name=string(\"{name}\"), val={val}];")

    def ints(self, values) -> str:
        values = [int(v) for v in values]
        name = "c_" + "_".join(str(v).replace("-", "m") for v in values)
        if name not in self.taken:
            self._name(name)
            decl = f"tensor<int32, [{len(values)}]>"
            self._const(decl, name, f"{decl}([{','.join(map(str, values))}])")
        return name

    def int1(self, v: int) -> str:
        name = "i_" + str(int(v)).replace("-", "m")
        if name not in self.taken:
            self._name(name)
            self._const("int32", name, f"int32({int(v)})")
        return name

    def flag(self, v: bool) -> str:
        name = "b_true" if v else "b_false"
        if name not in self.taken:
            self._name(name)
            self._const("bool", name, f"bool({'true' if v else 'false'})")
        return name

    def half(self, name: str, v: float) -> str:
        self._name(name)
        self.shapes[name] = None
        self._const("fp16", name, f"fp16({_fp16_literal(v)})")
        return name

    def blob(self, name: str, array: np.ndarray, file: str) -> str:
        shape = tuple(array.shape)
        path = f"@model_path/weights/{file}"
        self._name(name)
        self.shapes[name] = shape
        self.blobs[path] = build_blob(array)
        t = _ttype(shape)
        self._const(t, name, f"{t}(BLOBFILE(path=string(\"{path}\"), "
                             f"offset=uint64({BLOB_DESCRIPTOR_OFFSET})))")
        return name

    def _op(self, name, shape, rhs):
        self._name(name)
        self.shapes[name] = tuple(int(d) for d in shape)
        self._line(_ttype(shape), name, rhs)
        return name

    # -- ops -------------------------------------------------------------------------------
    def slice(self, name, x, begin, size):
        return self._op(name, size, f"slice_by_size(x={x},begin={self.ints(begin)},"
                                    f"size={self.ints(size)})")

    def reshape(self, name, x, shape):
        return self._op(name, shape, f"reshape(shape={self.ints(shape)},x={x})")

    def transpose(self, name, x, perm):
        s = self.shapes[x]
        return self._op(name, [s[p] for p in perm], f"transpose(perm={self.ints(perm)},x={x})")

    def swap_last(self, name, x):
        return self.transpose(name, x, [0, 1, 3, 2])

    def matmul(self, name, x, y, tx=False, ty=False):
        a, b = self.shapes[x], self.shapes[y]
        m, k = (a[-1], a[-2]) if tx else (a[-2], a[-1])
        k2, n = (b[-1], b[-2]) if ty else (b[-2], b[-1])
        if k != k2:
            raise AssertionError(f"{self.kernel}: matmul {name} contracts {k} with {k2}")
        batch = _broadcast(a[:-2], b[:-2])
        return self._op(name, batch + (m, n),
                        f"matmul(transpose_x={self.flag(tx)},transpose_y={self.flag(ty)},"
                        f"x={x},y={y})")

    def binary(self, op, name, x, y):
        sx, sy = self.shapes[x], self.shapes[y]
        shape = sx if sy is None else sy if sx is None else _broadcast(sx, sy)
        return self._op(name, shape, f"{op}(x={x},y={y})")

    def mul(self, name, x, y):
        return self.binary("mul", name, x, y)

    def add(self, name, x, y):
        return self.binary("add", name, x, y)

    def sub(self, name, x, y):
        return self.binary("sub", name, x, y)

    def pow(self, name, x, y):
        return self.binary("pow", name, x, y)

    def sigmoid(self, name, x):
        return self._op(name, self.shapes[x], f"sigmoid(x={x})")

    def softmax(self, name, x, axis):
        return self._op(name, self.shapes[x], f"softmax(axis={self.int1(axis)},x={x})")

    def reduce_sum(self, name, x, axis):
        s = list(self.shapes[x])
        s[axis] = 1
        return self._op(name, s, f"reduce_sum(axes={self.ints([axis])},"
                                 f"keep_dims={self.flag(True)},x={x})")

    def concat(self, name, values, axis):
        s = list(self.shapes[values[0]])
        s[axis] = sum(self.shapes[v][axis] for v in values)
        return self._op(name, s, f"concat(axis={self.int1(axis)},interleave={self.flag(False)},"
                                 f"values=({','.join(values)}))")

    def text(self, out: str) -> str:
        C, W = self.in_shape[1], self.in_shape[3]
        head = ["program(1.3)", _BUILD_INFO, "{",
                f"    func main<ios18>(tensor<fp16, [1, {C}, 1, {W}]> x) {{"]
        return "\n".join(head + self.lines + [f"    }} -> ({out});", "}", ""])


# -- shared pieces --------------------------------------------------------------------------

def _start(kernel, cfg):
    lay = layout(kernel, cfg)
    return lay, _Builder(kernel, lay.in_shape)


def _take(b: _Builder, lay: Layout, name: str, var: str = None) -> str:
    """Slice one input block out of x."""
    p = lay.block(name)
    return b.slice(var or name, "x", [0, p.row0, 0, p.col0], [1, p.rows, 1, p.cols])


def _finish(b: _Builder, lay: Layout, out: str) -> MilProgram:
    if b.shapes[out] != lay.out_shape:
        raise AssertionError(f"{lay.kernel}: output {b.shapes[out]} != table {lay.out_shape}")
    return MilProgram(lay.kernel, b.text(out), dict(b.blobs), lay.in_shape, lay.out_shape)


def _act_rows(b: _Builder, p: str, act: str, C: int, S: int) -> str:
    """act [1,C,1,S] -> [1,1,S,C], the left operand of the weight products."""
    return b.swap_last(f"{p}_t", b.reshape(f"{p}_r", act, [1, 1, C, S]))


def _weight_product(b: _Builder, p: str, at: str, w: str, C: int, O: int) -> str:
    """Product sum_c act[c, s] * w[c, o] of at = _act_rows(act) and a weight block
    [1,C,1,O], left in the [1,1,S,O] layout (the caller adds or transposes back)."""
    w2 = b.reshape(f"{p}_w", w, [1, 1, C, O])
    return b.matmul(f"{p}_mm", at, w2)


def _to_channels(b: _Builder, name: str, y: str, O: int, S: int) -> str:
    """[1,1,S,O] -> [1,O,1,S]."""
    yt = b.swap_last(f"{name}_t", y)
    return b.reshape(name, yt, [1, O, 1, S])


def _simple_matmul_kernel(kernel, cfg, act_name, w_name) -> MilProgram:
    lay, b = _start(kernel, cfg)
    C, S = lay.in_shape[1], cfg.seq_len
    O = lay.out_shape[1]
    at = _act_rows(b, "a", _take(b, lay, act_name), C, S)
    y = _weight_product(b, "p", at, _take(b, lay, w_name), C, O)
    return _finish(b, lay, _to_channels(b, "out", y, O, S))


def _two_matmul_kernel(kernel, cfg, a1, w1, a2, w2) -> MilProgram:
    lay, b = _start(kernel, cfg)
    C, S = lay.in_shape[1], cfg.seq_len
    O = lay.out_shape[1]
    at1 = _act_rows(b, "a1", _take(b, lay, a1), C, S)
    at2 = _act_rows(b, "a2", _take(b, lay, a2), C, S)
    y1 = _weight_product(b, "p1", at1, _take(b, lay, w1), C, O)
    y2 = _weight_product(b, "p2", at2, _take(b, lay, w2), C, O)
    y = b.add("sum", y1, y2)
    return _finish(b, lay, _to_channels(b, "out", y, O, S))


def _heads(b, name, x, n, hd, S):
    """[1, n*hd, 1, S] (or any layout of the same order) -> [1, n, hd, S]."""
    return b.reshape(name, x, [1, n, hd, S])


def _rms_norm_heads(b, p, x4, w, cfg):
    """RMSNorm over head_dim of x4 [1,n,hd,S], weight w [1,1,hd,1]."""
    hd = cfg.head_dim
    # Scaling by 1/sqrt(hd) before squaring makes the sum the mean of squares directly and
    # keeps it in fp16 range for any rms below 256 (the sum of raw squares would overflow
    # from rms ~ 23 at head_dim 128).
    inv = b.half(f"{p}_inv", 1.0 / np.sqrt(hd))
    xs = b.mul(f"{p}_xs", x4, inv)
    sq = b.mul(f"{p}_sq", xs, xs)
    ms = b.reduce_sum(f"{p}_ms", sq, 2)
    if np.float16(cfg.norm_eps) == 0:
        raise ValueError(f"norm_eps {cfg.norm_eps} rounds to 0 in fp16; QK-norm on the ANE "
                         f"needs at least 6e-8")
    eps = b.half(f"{p}_eps", cfg.norm_eps)
    me = b.add(f"{p}_me", ms, eps)
    nh = b.half(f"{p}_nh", -0.5)
    rr = b.pow(f"{p}_rr", me, nh)
    xr = b.mul(f"{p}_xr", x4, rr)
    return b.mul(f"{p}_y", xr, w)


def _rope(b, p, x4, cos, sin, cfg, n):
    """RoPE on x4 [1,n,hd,S]: x*cos + swap(x)*sin_signed, where swap exchanges the two
    members of every pair."""
    hd, S = cfg.head_dim, cfg.seq_len
    if cfg.rope_style == "interleaved":
        half = n * hd // 2
        xp = b.reshape(f"{p}_pairs", x4, [1, half, 2, S])
        x0 = b.slice(f"{p}_x0", xp, [0, 0, 0, 0], [1, half, 1, S])
        x1 = b.slice(f"{p}_x1", xp, [0, 0, 1, 0], [1, half, 1, S])
        sw = b.concat(f"{p}_sw2", [x1, x0], 2)
        sw = b.reshape(f"{p}_sw", sw, [1, n, hd, S])
    else:
        h2 = hd // 2
        x0 = b.slice(f"{p}_x0", x4, [0, 0, 0, 0], [1, n, h2, S])
        x1 = b.slice(f"{p}_x1", x4, [0, 0, h2, 0], [1, n, h2, S])
        sw = b.concat(f"{p}_sw", [x1, x0], 2)
    xc = b.mul(f"{p}_c", x4, cos)
    xs = b.mul(f"{p}_s", sw, sin)
    return b.add(f"{p}_rope", xc, xs)


def _repeat_kv(b, p, x4, cfg):
    """[1, n_kv, hd, S] -> [1, n_heads, hd, S], head h reading kv head h // ratio."""
    r = cfg.n_heads // cfg.n_kv_heads
    if r == 1:
        return x4
    nkv, hd, S = cfg.n_kv_heads, cfg.head_dim, cfg.seq_len
    flat = b.reshape(f"{p}_g", x4, [1, nkv, 1, hd * S])
    tiled = b.concat(f"{p}_tile", [flat] * r, 2)          # [1, nkv, r, hd*S]
    return b.reshape(f"{p}_rep", tiled, [1, cfg.n_heads, hd, S])


def _attention_probs(b, q4, k4, cfg):
    """Causal softmax of scale * q^T k per head: [1, n_heads, S(query), S(key)]."""
    S = cfg.seq_len
    # The scale goes on q before the product so that the fp16 scores stay sqrt(hd) times
    # further from overflow.
    sc = b.half("scale", 1.0 / np.sqrt(cfg.head_dim))
    qs = b.mul("q_scaled", q4, sc)
    scores = b.matmul("scores", qs, k4, tx=True)
    mask = b.blob("mask", causal_mask(S).reshape(1, 1, S, S), "mask.bin")
    masked = b.add("masked", scores, mask)
    return b.softmax("probs4", masked, -1)


# -- the ten generators ---------------------------------------------------------------------

def gen_sdpaFwd(cfg) -> MilProgram:
    lay, b = _start("sdpaFwd", cfg)
    D, S, Q, K, hd = cfg.dim, cfg.seq_len, cfg.q_dim, cfg.kv_dim, cfg.head_dim
    nh, nkv = cfg.n_heads, cfg.n_kv_heads
    xn = _take(b, lay, "xnorm", "xn")
    wq = _take(b, lay, "Wq", "wq")
    wk = _take(b, lay, "Wk", "wk")
    wv = _take(b, lay, "Wv", "wv")
    xt = _act_rows(b, "xn", xn, D, S)
    q = _to_channels(b, "q_proj", _weight_product(b, "pq", xt, wq, D, Q), Q, S)
    k = _to_channels(b, "k_proj", _weight_product(b, "pk", xt, wk, D, K), K, S)
    v = _to_channels(b, "v_proj", _weight_product(b, "pv", xt, wv, D, K), K, S)
    q4 = _heads(b, "q4", q, nh, hd, S)
    k4 = _heads(b, "k4", k, nkv, hd, S)
    v4 = _heads(b, "v4", v, nkv, hd, S)
    if cfg.qk_norm:
        qw = b.reshape("qn_w", _take(b, lay, "q_norm", "qn_blk"), [1, 1, hd, 1])
        kw = b.reshape("kn_w", _take(b, lay, "k_norm", "kn_blk"), [1, 1, hd, 1])
        q4 = _rms_norm_heads(b, "qn", q4, qw, cfg)
        k4 = _rms_norm_heads(b, "kn", k4, kw, cfg)
    cos_t, sin_t = rope_tables(cfg)
    cos = b.blob("rope_cos", cos_t.reshape(1, 1, hd, S), "rope_cos.bin")
    sin = b.blob("rope_sin", sin_t.reshape(1, 1, hd, S), "rope_sin.bin")
    qr = _rope(b, "qr", q4, cos, sin, cfg, nh)
    kr = _rope(b, "kr", k4, cos, sin, cfg, nkv)
    probs = _attention_probs(b, qr, _repeat_kv(b, "k", kr, cfg), cfg)
    a4 = b.matmul("attn4", _repeat_kv(b, "v", v4, cfg), probs, ty=True)   # [1,nh,hd,S]
    parts = [b.reshape("attn", a4, [1, Q, 1, S]),
             b.reshape("q_rope", qr, [1, Q, 1, S]),
             b.reshape("k_rope", kr, [1, K, 1, S]),
             v]
    if cfg.qk_norm:
        parts += [q, k]
    return _finish(b, lay, b.concat("out", parts, 1))


def gen_woFwd(cfg) -> MilProgram:
    return _simple_matmul_kernel("woFwd", cfg, "attn", "Wo")


def gen_ffnFused(cfg) -> MilProgram:
    lay, b = _start("ffnFused", cfg)
    D, H, S = cfg.dim, cfg.hidden_dim, cfg.seq_len
    xn = _take(b, lay, "x2norm", "xn")
    x2 = _take(b, lay, "x2")
    w1 = _take(b, lay, "W1", "w1")
    w3 = _take(b, lay, "W3", "w3")
    w2 = _take(b, lay, "W2", "w2")
    xt = _act_rows(b, "xn", xn, D, S)
    h1 = _to_channels(b, "h1", _weight_product(b, "p1", xt, w1, D, H), H, S)
    h3 = _to_channels(b, "h3", _weight_product(b, "p3", xt, w3, D, H), H, S)
    sg = b.sigmoid("sig", h1)
    si = b.mul("silu", h1, sg)
    gate = b.mul("gate", si, h3)
    # W2 is staged as is (row d = W2[d, :]), so the down projection contracts over the
    # block's columns: one plain matmul, no transposes.
    g2 = b.reshape("gate2", gate, [1, 1, H, S])
    w22 = b.reshape("w2r", w2, [1, 1, D, H])
    f = b.reshape("ffn", b.matmul("ffn_mm", w22, g2), [1, D, 1, S])
    if float(cfg.residual_scale) != 1.0:
        f = b.mul("ffn_scaled", f, b.half("res_scale", cfg.residual_scale))
    xnext = b.add("x_next", x2, f)
    return _finish(b, lay, b.concat("out", [xnext, h1, h3, gate], 1))


def gen_ffnBwdW2t(cfg) -> MilProgram:
    return _simple_matmul_kernel("ffnBwdW2t", cfg, "dffn", "W2")


def gen_ffnBwdW13t(cfg) -> MilProgram:
    return _two_matmul_kernel("ffnBwdW13t", cfg, "dh1", "W1", "dh3", "W3")


def gen_wotBwd(cfg) -> MilProgram:
    return _simple_matmul_kernel("wotBwd", cfg, "dy", "Wo")


def gen_sdpaBwd1(cfg) -> MilProgram:
    lay, b = _start("sdpaBwd1", cfg)
    nh, hd, S, Q, P = cfg.n_heads, cfg.head_dim, cfg.seq_len, cfg.q_dim, cfg.n_heads * cfg.seq_len
    q4 = _heads(b, "q4", _take(b, lay, "q"), nh, hd, S)
    k4 = _heads(b, "k4", _take(b, lay, "k_rep"), nh, hd, S)
    v4 = _heads(b, "v4", _take(b, lay, "v_rep"), nh, hd, S)
    da4 = _heads(b, "da4", _take(b, lay, "da"), nh, hd, S)
    probs = _attention_probs(b, q4, k4, cfg)
    dv4 = b.matmul("dv4", da4, probs)                       # [1,nh,hd,S(key)]
    dp4 = b.matmul("dp4", da4, v4, tx=True)                 # [1,nh,S(query),S(key)]
    parts = [b.reshape("probs", probs, [1, P, 1, S]),
             b.reshape("dprobs", dp4, [1, P, 1, S]),
             b.reshape("dv_rep", dv4, [1, Q, 1, S])]
    return _finish(b, lay, b.concat("out", parts, 1))


def gen_sdpaBwd2(cfg) -> MilProgram:
    lay, b = _start("sdpaBwd2", cfg)
    nh, hd, S, Q = cfg.n_heads, cfg.head_dim, cfg.seq_len, cfg.q_dim
    p4 = b.reshape("p4", _take(b, lay, "probs"), [1, nh, S, S])
    dp4 = b.reshape("dp4", _take(b, lay, "dprobs"), [1, nh, S, S])
    q4 = _heads(b, "q4", _take(b, lay, "q"), nh, hd, S)
    k4 = _heads(b, "k4", _take(b, lay, "k_rep"), nh, hd, S)
    pdp = b.mul("pdp", p4, dp4)
    rs = b.reduce_sum("rowdot", pdp, 3)
    centred = b.sub("centred", dp4, rs)
    ds0 = b.mul("ds0", p4, centred)
    ds = b.mul("ds", ds0, b.half("scale", 1.0 / np.sqrt(hd)))
    dq4 = b.matmul("dq4", k4, ds, ty=True)                  # [1,nh,hd,S(query)]
    dk4 = b.matmul("dk4", q4, ds)                           # [1,nh,hd,S(key)]
    parts = [b.reshape("dq", dq4, [1, Q, 1, S]), b.reshape("dk_rep", dk4, [1, Q, 1, S])]
    return _finish(b, lay, b.concat("out", parts, 1))


def gen_qBwd(cfg) -> MilProgram:
    return _simple_matmul_kernel("qBwd", cfg, "dq", "Wq")


def gen_kvBwd(cfg) -> MilProgram:
    return _two_matmul_kernel("kvBwd", cfg, "dk", "Wk", "dv", "Wv")


GENERATORS = {
    "sdpaFwd": gen_sdpaFwd, "woFwd": gen_woFwd, "ffnFused": gen_ffnFused,
    "ffnBwdW2t": gen_ffnBwdW2t, "ffnBwdW13t": gen_ffnBwdW13t, "wotBwd": gen_wotBwd,
    "sdpaBwd1": gen_sdpaBwd1, "sdpaBwd2": gen_sdpaBwd2, "qBwd": gen_qBwd, "kvBwd": gen_kvBwd,
}
assert tuple(GENERATORS) == KERNEL_NAMES
__all__ += [f"gen_{k}" for k in KERNEL_NAMES]


def generate(kernel: str, cfg) -> MilProgram:
    if kernel not in GENERATORS:
        raise KeyError(f"unknown kernel {kernel!r}; known: {', '.join(KERNEL_NAMES)}")
    return GENERATORS[kernel](cfg)
