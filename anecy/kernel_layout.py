"""The layout contract of the ten ANE kernels: ``KERNELS``, the one table of their packed
input and output layouts, its resolution for a config, the packing helpers, and the RoPE
tables and causal mask in the programs' layout.

Every kernel takes ONE fp16 input ``[1, C, 1, W]`` in which activations and weights sit
side by side along the spatial axis (docs/ARCHITECTURE.md, section 4), so a program never
has to be recompiled when the weights change: each layer owns an input buffer whose weight
columns are staged once per optimizer update and whose activation columns are rewritten
every microstep.  ``KERNELS`` below is the only place where those layouts are written down; the
program generators (``anecy.mil``), the packing helpers here and in ``anecy._packed`` used by
the ``sim`` and ``ane`` backends, and the tests all read it.

CPU-side activations are channel-first ``[C, S]``; weights are in HF orientation
``W[out, in]``.

QK-norm (Qwen3): its two weight vectors [head_dim] are dynamic like every other weight, so
sdpaFwd's input gains columns after ``xnorm | Wq^T | Wk^T | Wv^T``: ``q_norm`` and ``k_norm``,
NW columns each (NW = 1 whenever head_dim <= dim, as in every real model: value i of the
vector at row i, the other rows zero; otherwise value i at row i // NW, column i % NW), then
zero columns up to a multiple of 32.  The output gains ``q_pre`` and ``k_pre`` (the
projections before the norm), from which the CPU computes the norm's backward.
"""

from __future__ import annotations

import re
from dataclasses import astuple, dataclass

import numpy as np

from . import _ops

__all__ = [
    "Block", "Out", "Kernel", "KERNELS", "KERNEL_NAMES", "Placed", "Layout", "layout",
    "input_shape", "output_shape", "column_offsets", "input_channel_offsets",
    "output_offsets", "new_input_buffer", "stage_weights", "write_activations",
    "pack_input", "unpack_output", "MASK_VALUE", "rope_tables", "causal_mask",
]


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
# Constants in the programs' layout
# =========================================================================================

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
