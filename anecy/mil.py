"""MIL programs for the ten ANE kernels, generated from the layout table
(``anecy.kernel_layout.KERNELS``): each program slices its blocks out of the one packed input
that table describes and concatenates its outputs in the table's order.

Conventions shared by every generator:

* Inside the programs the attention works per head in the channel-first layout
  ``[1, heads, head_dim, S]`` (a free reshape of ``[1, heads*head_dim, 1, S]``), so the
  score and value products are single batched matmuls with no transposes.
* The weight products keep the pattern the public reference measured on hardware:
  activation ``[1,1,S,C]`` times weight block ``[1,1,C,O]`` then one transpose back (the
  one exception, ffnFused's down projection, has W2 staged as is and needs no transpose).
* GQA follows HF ``repeat_kv``: query head ``h`` reads kv head ``h // (n_heads // n_kv_heads)``.
* QK-norm (Qwen3) is applied per head before RoPE.
* Constants (causal mask, RoPE tables) are BLOBFILE constants: ``MilProgram.blobs`` maps the
  ``@model_path/weights/...`` path of each to its bytes (``anecy.blob``: header + fp16
  payload).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .blob import BLOB_DESCRIPTOR_OFFSET, build_blob
from .kernel_layout import KERNEL_NAMES, Layout, causal_mask, layout, rope_tables

__all__ = ["MilProgram", "GENERATORS", "generate"]  # + the ten gen_<kernel> functions


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
