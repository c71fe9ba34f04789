"""A strict numpy interpreter for the subset of MIL that ``anecy.mil`` emits.

It has two jobs.  It is the ``sim`` backend's executor, so that the exact fp16 buffers and
programs meant for the ANE can be exercised on any machine; and it is the project's linter
for what goes to the ANE, which reports little more than "compile failed" when a program is
wrong.  So it refuses anything it does not understand: unknown ops, parameters or
attributes; declared types or shapes that differ from the computed ones; reused names;
undefined variables; BLOBFILE constants whose file is missing, has a bad header or holds
the wrong number of values.  Every refusal is a ``MilError`` naming the line.

Numerics: every tensor is stored as fp16.  Each op converts its fp16 inputs to fp32,
computes in fp32 (matmul and reductions accumulate in fp32) and rounds its result to fp16
once, round-to-nearest-even, overflowing to +-inf as fp16 does.  This models the ANE, which
stores fp16 between ops but accumulates wider inside them; it gives one rounding per op,
so the simulated error is of the size the hardware's is, while real fp16 hazards
(overflow of large sums or products, underflow of small gradients, the rounding of
constants and of every intermediate) show up exactly where they would on the device.
Data movement ops (slice, reshape, transpose, concat) are exact.

``check(program)`` type-checks without executing (shape-only; fast for full-size models);
``run(program, x)`` executes; ``Interpreter`` parses and checks once and runs many times.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .blob import read_blob

__all__ = ["MilError", "Type", "Op", "Interpreter", "parse", "check", "run", "OPS"]


class MilError(ValueError):
    """A program the ANE path must not receive; the message names the line."""


# =========================================================================================
# Types
# =========================================================================================

_DTYPES = ("fp16", "int32", "bool")


@dataclass(frozen=True)
class Type:
    dtype: str
    shape: tuple[int, ...] | None     # None for a scalar

    def __str__(self):
        if self.shape is None:
            return self.dtype
        return f"tensor<{self.dtype}, [{','.join(map(str, self.shape))}]>"

    @property
    def is_fp16_tensor(self):
        return self.dtype == "fp16" and self.shape is not None


# =========================================================================================
# Parsing
# =========================================================================================

_TOKEN = re.compile(r"""\s*(?:
      (?P<str>"[^"\\]*")
    | (?P<num>[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)
    | (?P<id>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<punct>[<>\[\](){},=;])
    )""", re.VERBOSE)


@dataclass
class Stmt:
    lineno: int
    decl: Type
    var: str
    op: str
    args: dict[str, str | tuple[str, ...]]
    attrs: dict[str, tuple]


@dataclass
class Program:
    input_name: str
    input_type: Type
    input_lineno: int
    stmts: list[Stmt] = field(default_factory=list)
    output: str = ""
    output_lineno: int = 0


class _Tokens:
    def __init__(self, text: str, lineno: int):
        self.lineno = lineno
        self.toks = []
        pos = 0
        text = text.rstrip()
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                raise self.error(f"unexpected text {text[pos:].strip()[:20]!r}")
            kind = m.lastgroup
            self.toks.append((kind, m.group(kind)))
            pos = m.end()
        self.i = 0

    def error(self, msg):
        return MilError(f"line {self.lineno}: {msg}")

    def peek(self, offset=0):
        j = self.i + offset
        return self.toks[j] if j < len(self.toks) else (None, None)

    def next(self):
        t = self.peek()
        if t[0] is None:
            raise self.error("unexpected end of line")
        self.i += 1
        return t

    def expect(self, text):
        kind, val = self.next()
        if val != text:
            raise self.error(f"expected {text!r}, found {val!r}")

    def ident(self):
        kind, val = self.next()
        if kind != "id":
            raise self.error(f"expected a name, found {val!r}")
        return val

    def number(self):
        kind, val = self.next()
        if kind != "num":
            raise self.error(f"expected a number, found {val!r}")
        return val

    def integer(self):
        val = self.number()
        if not re.fullmatch(r"[-+]?\d+", val):
            raise self.error(f"expected an integer, found {val!r}")
        return int(val)

    def string(self):
        kind, val = self.next()
        if kind != "str":
            raise self.error(f"expected a string, found {val!r}")
        return val[1:-1]

    def done(self):
        if self.i != len(self.toks):
            raise self.error(f"unexpected {self.toks[self.i][1]!r} after the end of the statement")

    # -- grammar pieces ----------------------------------------------------------------------
    def comma_list(self, close, item) -> list:
        """``item, item, ...`` (possibly none) up to and including ``close``: every list in
        the grammar (dimensions, values, names, parameters, attributes) is read here."""
        out = []
        while self.peek()[1] != close:
            if out:
                self.expect(",")
            out.append(item())
        self.expect(close)
        return out

    def dimension(self) -> int:
        d = self.integer()
        if d < 1:
            raise self.error(f"dimension {d} must be positive")
        return d

    def type_(self) -> Type:
        name = self.ident()
        if name == "tensor":
            self.expect("<")
            dtype = self.ident()
            if dtype not in _DTYPES:
                raise self.error(f"unknown dtype {dtype!r}")
            self.expect(",")
            self.expect("[")
            dims = self.comma_list("]", self.dimension)
            self.expect(">")
            if not dims:
                raise self.error("a tensor type needs at least one dimension")
            return Type(dtype, tuple(dims))
        if name in _DTYPES:
            return Type(name, None)
        raise self.error(f"unknown type {name!r}")

    def key_values(self, close, what, value=None):
        """`key=value, ...` up to and including `close`, each key once; values are read by
        ``value`` (default: an attribute value)."""
        value = value or self.value
        out = {}

        def item():
            key = self.ident()
            if key in out:
                raise self.error(f"{what} {key!r} given twice")
            self.expect("=")
            out[key] = value()
        self.comma_list(close, item)
        return out

    def argument(self):
        """An op argument: a variable name or a parenthesised tuple of them."""
        if self.peek()[1] != "(":
            return self.ident()
        self.next()
        names = self.comma_list(")", self.ident)
        if not names:
            raise self.error("expected a name, found ')'")
        return tuple(names)

    def value(self):
        """An attribute value: ('string', s) | ('bool', b) | ('int32', i) | ('fp16', f) |
        ('uint64', i) | ('list', Type, [numbers]) | ('blob', Type, path, offset)."""
        kind, name = self.peek()
        if name == "tensor":
            t = self.type_()
            self.expect("(")
            if self.peek()[1] == "BLOBFILE":
                self.next()
                self.expect("(")
                args = self.key_values(")", "BLOBFILE argument")
                self.expect(")")
                if set(args) != {"path", "offset"}:
                    raise self.error(f"BLOBFILE takes path and offset, got {sorted(args)}")
                if args["path"][0] != "string" or args["offset"][0] != "uint64":
                    raise self.error("BLOBFILE needs path=string(...) and offset=uint64(...)")
                return ("blob", t, args["path"][1], args["offset"][1])
            self.expect("[")
            vals = self.comma_list("]", self.number)
            self.expect(")")
            return ("list", t, vals)
        name = self.ident()
        self.expect("(")
        if name == "string":
            v = ("string", self.string())
        elif name == "bool":
            b = self.ident()
            if b not in ("true", "false"):
                raise self.error(f"bool literal must be true or false, got {b!r}")
            v = ("bool", b == "true")
        elif name in ("int32", "uint64"):
            i = self.integer()
            if name == "uint64" and i < 0:
                raise self.error("uint64 literal is negative")
            v = (name, i)
        elif name == "fp16":
            v = ("fp16", float(self.number()))
        else:
            raise self.error(f"unknown literal kind {name!r}")
        self.expect(")")
        return v


_FUNC = re.compile(r"^func\s+main\s*<ios18>\s*\((?P<params>.*)\)\s*\{$")
_RET = re.compile(r"^\}\s*->\s*\((?P<outs>.*)\)\s*;$")
_BUILD_INFO = re.compile(r"^\[buildInfo\s*=\s*dict<string,\s*string>\(\{.*\}\)\]$")


def _parse_stmt(line: str, lineno: int) -> Stmt:
    t = _Tokens(line, lineno)
    decl = t.type_()
    var = t.ident()
    t.expect("=")
    op = t.ident()
    t.expect("(")
    args: dict[str, str | tuple[str, ...]] = t.key_values(")", f"{op}: parameter",
                                                                 t.argument)
    t.expect("[")
    attrs: dict[str, tuple] = t.key_values("]", "attribute")
    t.expect(";")
    t.done()
    return Stmt(lineno, decl, var, op, args, attrs)


def parse(text: str) -> Program:
    """Parse program text into statements (syntax only; see ``check`` for the rest)."""
    if not isinstance(text, str):
        raise MilError("line 0: program text must be a string")
    lines = text.split("\n")
    state = "program"
    prog: Program | None = None
    last = 0
    for idx, raw in enumerate(lines):
        lineno = idx + 1
        line = raw.strip()
        if not line:
            continue
        last = lineno
        if state == "program":
            if line != "program(1.3)":
                raise MilError(f"line {lineno}: expected 'program(1.3)'")
            state = "buildinfo"
        elif state == "buildinfo":
            if not _BUILD_INFO.match(line):
                raise MilError(f"line {lineno}: expected the "
                               f"[buildInfo = dict<string, string>(...)] line")
            state = "open"
        elif state == "open":
            if line != "{":
                raise MilError(f"line {lineno}: expected '{{'")
            state = "func"
        elif state == "func":
            m = _FUNC.match(line)
            if not m:
                raise MilError(f"line {lineno}: expected 'func main<ios18>(<type> <name>) {{'")
            t = _Tokens(m.group("params"), lineno)
            ptype = t.type_()
            pname = t.ident()
            if t.peek()[1] == ",":
                raise MilError(f"line {lineno}: main takes exactly one input (the ANE rejects "
                               f"multi-input requests; pack inputs along the spatial axis)")
            t.done()
            prog = Program(pname, ptype, lineno)
            state = "body"
        elif state == "body":
            m = _RET.match(line)
            if m:
                t = _Tokens(m.group("outs"), lineno)
                prog.output = t.ident()
                if t.peek()[1] == ",":
                    raise MilError(f"line {lineno}: main must return exactly one tensor")
                t.done()
                prog.output_lineno = lineno
                state = "close"
            else:
                prog.stmts.append(_parse_stmt(line, lineno))
        elif state == "close":
            if line != "}":
                raise MilError(f"line {lineno}: expected the closing '}}'")
            state = "end"
        else:
            raise MilError(f"line {lineno}: text after the end of the program")
    if state != "end":
        raise MilError(f"line {last + 1}: program ends early (incomplete {state})")
    return prog


# =========================================================================================
# Ops
# =========================================================================================
# Each op is one record: its parameters (name -> role), its result type and its result.
# Parameter roles: "tensor" an fp16 tensor; "num" an fp16 tensor or fp16 scalar; "tensors"
# a tuple of fp16 tensors; "ints" a const int32 vector; "int" a const int32 scalar; "bool" a
# const bool scalar.  A trailing "?" marks an optional parameter (MIL default in _DEFAULTS).
# ``infer(p, err)`` gets the parameters resolved to Types (const roles: their Python values)
# and returns the result Type or raises err(message); ``compute(p)`` gets them resolved to
# values (fp16 arrays) once ``infer`` has accepted them.  Data movement ops (``exact``) give
# back fp16 values unchanged; the others compute in fp32 and are rounded to fp16 once.


@dataclass(frozen=True)
class Op:
    params: dict[str, str]
    infer: Callable[[dict, Callable[[str], MilError]], Type]
    compute: Callable[[dict], np.ndarray]
    exact: bool = False


_DEFAULTS = {"transpose_x": False, "transpose_y": False, "keep_dims": False, "interleave": False}
# the ANE works on NCHW tensors; every hardware-verified program uses rank 4 throughout
_RANK = 4


def _f16(a) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(a, dtype=np.float32).astype(np.float16)


def _f32(a) -> np.ndarray:
    return np.asarray(a).astype(np.float32)


def _axis(err, axis, rank, what):
    if not -rank <= axis < rank:
        raise err(f"{what} {axis} is out of range for rank {rank}")
    return axis % rank


def _fp16(shape) -> Type:
    return Type("fp16", tuple(shape))


def _slice_type(p, err):
    s = p["x"].shape
    begin, size = p["begin"], p["size"]
    if len(begin) != len(s) or len(size) != len(s):
        raise err(f"begin/size need {len(s)} entries, got {len(begin)}/{len(size)}")
    for d, (b, n, dim) in enumerate(zip(begin, size, s)):
        if b < 0 or n < 1 or b + n > dim:
            raise err(f"slice [{b}, {b}+{n}) is outside axis {d} of size {dim}")
    return _fp16(size)


def _slice(p):
    return p["x"][tuple(slice(b, b + n) for b, n in zip(p["begin"], p["size"]))]


def _reshape_type(p, err):
    shape = p["shape"]
    if any(d < 1 for d in shape):
        raise err(f"reshape shape {shape} must be all positive (no -1 or 0)")
    if int(np.prod(shape)) != int(np.prod(p["x"].shape)):
        raise err(f"cannot reshape {p['x']} ({int(np.prod(p['x'].shape))} values) to {shape}")
    return _fp16(shape)


def _transpose_type(p, err):
    s, perm = p["x"].shape, p["perm"]
    if sorted(perm) != list(range(len(s))):
        raise err(f"perm {perm} is not a permutation of {len(s)} axes")
    return _fp16(s[i] for i in perm)


def _matmul_type(p, err):
    a, b = p["x"].shape, p["y"].shape
    if len(a) != len(b):
        raise err(f"matmul of ranks {len(a)} and {len(b)}")
    m, k = (a[-1], a[-2]) if p["transpose_x"] else (a[-2], a[-1])
    k2, n = (b[-1], b[-2]) if p["transpose_y"] else (b[-2], b[-1])
    if k != k2:
        raise err(f"matmul inner dimensions differ: {k} and {k2}")
    try:
        batch = np.broadcast_shapes(a[:-2], b[:-2])
    except ValueError:
        raise err(f"matmul batch dimensions {a[:-2]} and {b[:-2]} do not broadcast") from None
    return _fp16(tuple(batch) + (m, n))


def _matmul(p):
    a, b = _f32(p["x"]), _f32(p["y"])
    if p["transpose_x"]:
        a = np.swapaxes(a, -1, -2)
    if p["transpose_y"]:
        b = np.swapaxes(b, -1, -2)
    return np.matmul(a, b)


def _elementwise(name, ufunc) -> Op:
    """A binary op whose operands are fp16 tensors of one rank (broadcast) or scalars."""
    def infer(p, err):
        x, y = p["x"], p["y"]
        if x.shape is None and y.shape is None:
            raise err(f"{name} needs at least one tensor operand")
        if x.shape is None or y.shape is None:
            return Type("fp16", x.shape or y.shape)
        if len(x.shape) != len(y.shape):
            raise err(f"{name} of ranks {len(x.shape)} and {len(y.shape)}")
        try:
            return _fp16(np.broadcast_shapes(x.shape, y.shape))
        except ValueError:
            raise err(f"{name}: shapes {x.shape} and {y.shape} do not broadcast") from None
    return Op({"x": "num", "y": "num"}, infer, lambda p: ufunc(_f32(p["x"]), _f32(p["y"])))


def _softmax_type(p, err):
    _axis(err, p["axis"], len(p["x"].shape), "softmax axis")
    return p["x"]


def _softmax(p):
    x = _f32(p["x"])
    ax = p["axis"] % x.ndim
    e = np.exp(x - np.max(x, axis=ax, keepdims=True))
    return e / np.sum(e, axis=ax, keepdims=True)


def _reduce_sum_type(p, err):
    s = p["x"].shape
    axes = [_axis(err, a, len(s), "reduce_sum axis") for a in p["axes"]]
    if not axes or len(set(axes)) != len(axes):
        raise err(f"reduce_sum axes {p['axes']} must be distinct and non-empty")
    if p["keep_dims"]:
        return _fp16(1 if i in axes else d for i, d in enumerate(s))
    return _fp16(d for i, d in enumerate(s) if i not in axes)


def _concat_type(p, err):
    vals = p["values"]
    if p["interleave"]:
        raise err("concat with interleave=true is not supported")
    rank = len(vals[0].shape)
    ax = _axis(err, p["axis"], rank, "concat axis")
    out = list(vals[0].shape)
    for v in vals[1:]:
        if len(v.shape) != rank or any(d != e for i, (d, e) in
                                       enumerate(zip(v.shape, vals[0].shape)) if i != ax):
            raise err(f"concat operands {vals[0]} and {v} differ off axis {ax}")
        out[ax] += v.shape[ax]
    return _fp16(out)


_OPS: dict[str, Op] = {
    "slice_by_size": Op({"x": "tensor", "begin": "ints", "size": "ints"},
                        _slice_type, _slice, exact=True),
    "reshape": Op({"x": "tensor", "shape": "ints"},
                  _reshape_type, lambda p: p["x"].reshape(p["shape"]), exact=True),
    "transpose": Op({"x": "tensor", "perm": "ints"}, _transpose_type,
                    lambda p: np.ascontiguousarray(np.transpose(p["x"], p["perm"])), exact=True),
    "matmul": Op({"x": "tensor", "y": "tensor", "transpose_x": "bool?", "transpose_y": "bool?"},
                 _matmul_type, _matmul),
    "mul": _elementwise("mul", np.multiply),
    "add": _elementwise("add", np.add),
    "sub": _elementwise("sub", np.subtract),
    "pow": _elementwise("pow", np.power),
    "softmax": Op({"x": "tensor", "axis": "int"}, _softmax_type, _softmax),
    "reduce_sum": Op({"x": "tensor", "axes": "ints", "keep_dims": "bool?"}, _reduce_sum_type,
                     lambda p: np.sum(_f32(p["x"]), axis=tuple(p["axes"]),
                                      keepdims=p["keep_dims"])),
    "concat": Op({"values": "tensors", "axis": "int", "interleave": "bool?"}, _concat_type,
                 lambda p: np.concatenate(p["values"], axis=p["axis"]), exact=True),
    "sigmoid": Op({"x": "tensor"}, lambda p, err: p["x"],
                  lambda p: np.float32(1.0) / (np.float32(1.0) + np.exp(-_f32(p["x"])))),
}

# Every op's parameters by name (const takes none: its value is an attribute).
OPS: dict[str, dict[str, str]] = {"const": {}, **{k: op.params for k, op in _OPS.items()}}


# =========================================================================================
# Checking and running
# =========================================================================================

class Interpreter:
    """A parsed and type-checked program, ready to run many times.

    ``program`` is a ``MilProgram`` (anything with ``.text`` and ``.blobs``), or program text
    with ``blobs`` (path -> bytes) passed separately.  Construction checks the whole program
    in shape-only mode, so a bad program fails here, before any data is touched."""

    def __init__(self, program, blobs: dict[str, bytes] | None = None):
        if hasattr(program, "text"):
            text = program.text
            if blobs is None:
                blobs = getattr(program, "blobs", None)
        else:
            text = program
        self.blobs = dict(blobs or {})
        self.program = parse(text)
        self.consts: dict[str, object] = {}
        self.output_type = self._walk(None)

    @property
    def input_type(self) -> Type:
        return self.program.input_type

    # -- the walk shared by checking and running -------------------------------------------
    def _walk(self, x: np.ndarray | None):
        execute = x is not None
        prog = self.program
        types: dict[str, Type] = {}
        where: dict[str, int] = {}
        values: dict[str, np.ndarray] = {}

        def err_at(lineno):
            return lambda msg: MilError(f"line {lineno}: {msg}")

        it = prog.input_type
        if not it.is_fp16_tensor or len(it.shape) != _RANK:
            raise MilError(f"line {prog.input_lineno}: the input must be a rank-{_RANK} fp16 "
                           f"tensor, got {it}")
        types[prog.input_name] = it
        where[prog.input_name] = prog.input_lineno
        if execute:
            values[prog.input_name] = x

        for st in prog.stmts:
            err = err_at(st.lineno)
            if st.var in where:
                raise err(f"name {st.var!r} is already defined on line {where[st.var]}")
            if st.decl.is_fp16_tensor and len(st.decl.shape) != _RANK:
                raise err(f"{st.var}: fp16 tensors must have rank {_RANK}, declared {st.decl}")
            if st.op not in OPS:
                raise err(f"unknown op {st.op!r}")
            name_attr = st.attrs.get("name")
            if name_attr is None or name_attr[0] != "string":
                raise err(f"{st.op}: missing name=string(...) attribute")
            if name_attr[1] != st.var:
                raise err(f"{st.op}: name attribute {name_attr[1]!r} differs from the "
                          f"variable {st.var!r}")
            if st.op == "const":
                t, val = self._const(st, err)
            else:
                t, val = self._op(st, err, types, values, execute)
            if t != st.decl:
                raise err(f"{st.var}: declared {st.decl} but {st.op} gives {t}")
            types[st.var] = t
            where[st.var] = st.lineno
            if val is not None:
                values[st.var] = val

        out = prog.output
        if out not in types:
            raise MilError(f"line {prog.output_lineno}: output {out!r} is not defined")
        if not types[out].is_fp16_tensor:
            raise MilError(f"line {prog.output_lineno}: output {out!r} is {types[out]}, "
                           f"not an fp16 tensor")
        if execute:
            return values[out]
        return types[out]

    def _const(self, st: Stmt, err):
        if st.args:
            raise err(f"const takes no parameters, got {sorted(st.args)}")
        unknown = sorted(set(st.attrs) - {"name", "val"})
        if unknown:
            raise err(f"const: unknown attribute(s) {unknown}")
        if "val" not in st.attrs:
            raise err("const: missing val attribute")
        if st.var in self.consts:
            v = self.consts[st.var]
            return (st.decl, v)      # already validated on an earlier walk
        v = st.attrs["val"]
        kind = v[0]
        if kind == "bool":
            t, val = Type("bool", None), bool(v[1])
        elif kind == "int32":
            if not -2**31 <= v[1] < 2**31:
                raise err(f"int32 literal {v[1]} is out of range")
            t, val = Type("int32", None), int(v[1])
        elif kind == "fp16":
            t, val = Type("fp16", None), np.float16(v[1])
            if not np.isfinite(val) and np.isfinite(v[1]):
                raise err(f"fp16 literal {v[1]} overflows fp16")
        elif kind == "list":
            t = v[1]
            if t.dtype != "int32" or len(t.shape) != 1:
                raise err(f"only int32 vectors may be written inline, got {t} "
                          f"(fp16 tensors come from BLOBFILE)")
            try:
                val = [int(n) for n in v[2]]
            except ValueError:
                raise err(f"int32 vector holds a non-integer: {v[2]}") from None
            if len(val) != t.shape[0]:
                raise err(f"{t} literal has {len(val)} values")
            val = tuple(val)
        elif kind == "blob":
            t, path, offset = v[1], v[2], v[3]
            if t.dtype != "fp16":
                raise err(f"BLOBFILE constants must be fp16, got {t}")
            if path not in self.blobs:
                raise err(f"BLOBFILE path {path!r} is not in the blob set")
            try:
                flat = read_blob(self.blobs[path], offset)
            except ValueError as e:
                raise err(f"blob {path!r}: {e}") from None
            need = int(np.prod(t.shape))
            if flat.size != need:
                raise err(f"blob {path!r} holds {flat.size} fp16 values, {t} needs {need}")
            val = flat.reshape(t.shape)
        else:
            raise err(f"const val of kind {kind!r} is not supported")
        self.consts[st.var] = val
        return t, val

    def _op(self, st: Stmt, err, types, values, execute):
        op = _OPS[st.op]
        sig = op.params
        unknown = sorted(set(st.attrs) - {"name"})
        if unknown:
            raise err(f"{st.op}: unknown attribute(s) {unknown}")
        bad = sorted(set(st.args) - set(sig))
        if bad:
            raise err(f"{st.op}: unknown parameter(s) {bad}")
        p_types, p_vals = {}, {}
        for pname, role in sig.items():
            optional = role.endswith("?")
            role = role.rstrip("?")
            if pname not in st.args:
                if optional:
                    p_types[pname] = p_vals[pname] = _DEFAULTS[pname]
                    continue
                raise err(f"{st.op}: missing parameter {pname!r}")
            ref = st.args[pname]
            if role == "tensors":
                if not isinstance(ref, tuple):
                    raise err(f"{st.op}: {pname} must be a tuple of tensors")
                refs = ref
            elif isinstance(ref, tuple):
                raise err(f"{st.op}: {pname} must be a single name, not a tuple")
            else:
                refs = (ref,)
            for r in refs:
                if r not in types:
                    raise err(f"{st.op}: {pname}={r} is not defined")
            ts = [types[r] for r in refs]
            if role in ("tensor", "tensors"):
                for r, t in zip(refs, ts):
                    if not t.is_fp16_tensor:
                        raise err(f"{st.op}: {pname}={r} must be an fp16 tensor, is {t}")
                p_types[pname] = ts if role == "tensors" else ts[0]
                if execute:
                    p_vals[pname] = [values[r] for r in refs] if role == "tensors" \
                        else values[refs[0]]
            elif role == "num":
                t = ts[0]
                if t.dtype != "fp16":
                    raise err(f"{st.op}: {pname}={ref} must be fp16, is {t}")
                p_types[pname] = t
                if execute:
                    p_vals[pname] = values[ref]
            else:
                want = {"ints": Type("int32", None), "int": Type("int32", None),
                        "bool": Type("bool", None)}[role]
                t = ts[0]
                if ref not in self.consts:
                    raise err(f"{st.op}: {pname}={ref} must be a const")
                if role == "ints":
                    if t.dtype != "int32" or t.shape is None or len(t.shape) != 1:
                        raise err(f"{st.op}: {pname}={ref} must be an int32 vector, is {t}")
                elif t != want:
                    raise err(f"{st.op}: {pname}={ref} must be {want}, is {t}")
                p_types[pname] = p_vals[pname] = self.consts[ref]
        out_t = op.infer(p_types, err)
        if not execute:
            return out_t, None
        if op.exact:
            r = np.asarray(op.compute(p_vals), dtype=np.float16)
        else:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
                r = _f16(op.compute(p_vals))
        if r.shape != out_t.shape:  # pragma: no cover - infer and compute disagree
            raise err(f"internal: {st.op} computed {r.shape}, inferred {out_t.shape}")
        return out_t, r

    # -- public -----------------------------------------------------------------------------
    def run(self, x) -> np.ndarray:
        """Execute on an fp16 input [1, C, 1, W] (or [C, W]); returns fp16 [1, C', 1, S]."""
        x = np.asarray(x)
        if x.dtype != np.float16:
            raise ValueError(f"input must be float16, got {x.dtype}")
        shape = self.input_type.shape
        if x.shape != shape:
            if x.shape == (shape[1], shape[3]) and shape[0] == 1 and shape[2] == 1:
                x = x.reshape(shape)
            else:
                raise ValueError(f"input has shape {x.shape}, the program takes {shape}")
        return self._walk(np.ascontiguousarray(x))


def check(program, blobs: dict[str, bytes] | None = None) -> Type:
    """Type-check ``program`` without executing it; returns the output type."""
    return Interpreter(program, blobs).output_type


def run(program, x, blobs: dict[str, bytes] | None = None) -> np.ndarray:
    """Check then execute ``program`` on the fp16 input ``x``; returns its fp16 output."""
    return Interpreter(program, blobs).run(x)
