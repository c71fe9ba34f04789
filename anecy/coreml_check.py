"""Apple's coremltools as a second, independent checker of anecy's MIL programs.

``anecy.milsim`` is anecy's own reading of MIL; a checker that anecy did not write is a
stronger one. This module has Apple's toolchain read every generated program:

- **opset and types**: each statement (parsed by milsim's parser, which checks syntax
  only) is rebuilt op by op with coremltools' MIL builder under the iOS18 opset, so
  coremltools validates every op, parameter name and operand dtype and infers every
  result type; each must equal the type the program declares.
- **values**: the same rebuild with the input as a constant makes coremltools' numpy value
  inference compute every op; each output block must lie within ``VALUE_ULPS`` fp16 ulps
  (of the block's largest value) of milsim's result on the same input.
- **blobs**: every BLOBFILE is read by coremltools' own blob storage reader and must hold
  the values anecy's reader (``blob.read_blob``) finds.
- **package**: the program is serialized to an iOS18 ``.mlpackage`` with an empty pass
  pipeline (so it stays as written), and the weights stored there must read back bit for
  bit.

What this proves: the programs are valid MIL for the iOS18 opset as Apple's tools define
it, their declared types are right, milsim's arithmetic agrees with an independent
implementation, the blob files are in Apple's format, and Core ML can load the program
(the package is what ``MLModel`` runs on a Mac). What it cannot: coremltools knows the
opset, not the Neural Engine's own limits (which ops, shapes and sizes the ANE compiler
accepts) or its arithmetic (accumulation width, exp/softmax approximations). Only the ane
backend on a Mac (``anecy selftest``) shows those.

Failures raise ``CheckFailure`` with a one-line message; its ``stage`` says which check
failed (``"parse"``, ``"blobs"``, ``"opset"``, ``"types"``, ``"values"``, ``"package"``).
"""

from __future__ import annotations

import contextlib
import gc
import io
import logging
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import mil, milsim
from .blob import read_blob
from .errors import BackendUnavailable
from .kernel_layout import layout, pack_input

__all__ = ["CheckFailure", "ProgramCheck", "VALUE_ULPS", "load_coremltools",
           "check_program", "check_kernel", "block_ulps", "random_input", "write_blobs",
           "check_package"]

# coremltools' const-folded values against milsim's, in fp16 ulps of each output block's
# largest value: one for the output's own rounding, one for what the ops before it that
# round differently in the two (matmul and reduce_sum summation order, coremltools' stepwise
# sigmoid and softmax) carry to it; tests/test_coreml.py gives the argument and the
# measurements (2 is reached, never exceeded). A wrong op, parameter or layout errs by
# hundreds of ulps.
VALUE_ULPS = 2.0

_OPSET = "iOS18"


class CheckFailure(AssertionError):
    """A program that Apple's toolchain rejects, or whose values disagree with milsim."""

    def __init__(self, kernel: str, stage: str, message: str):
        self.kernel, self.stage, self.detail = kernel, stage, message
        super().__init__(f"{kernel}: {stage}: {message}")


@dataclass
class ProgramCheck:
    """What ``check_program`` verified for one program."""
    kernel: str
    ops: int                                  # statements rebuilt (consts included)
    blobs: int                                # BLOBFILE constants read by coremltools
    value_ulps: dict[str, float] | None = None   # output block -> ulps vs milsim
    package: Path | None = None            # the .mlpackage written
    package_weights: int = 0                  # stored weights that read back bit for bit


# =========================================================================================
# coremltools, imported once and quietly
# =========================================================================================

_CT = None
_FRONTENDS = ("torch", "torchvision", "torchaudio", "tensorflow", "sklearn", "xgboost",
              "executorch")


def load_coremltools():
    """Import coremltools (pinned in the ``test`` and ``selftest`` extras) without its
    import-time chatter; raises BackendUnavailable with the install line if it is missing."""
    global _CT
    if _CT is not None:
        return _CT
    # coremltools probes for the frameworks it converts from and imports those it finds
    # (torch alone costs seconds); anecy hands it MIL, so it is told they are absent.
    hidden = [m for m in _FRONTENDS if m not in sys.modules]
    for m in hidden:
        sys.modules[m] = None
    try:
        with _quiet():
            import coremltools as ct
            from coremltools import libmilstoragepython  # noqa: F401 - fail early
            from coremltools.converters.mil import Builder  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"coremltools is not installed ({e}); "
                                 f"pip install 'anecy[selftest]'") from None
    finally:
        for m in hidden:
            if m in sys.modules and sys.modules[m] is None:
                del sys.modules[m]
    _fix_reduce_keepdims()
    _CT = ct
    return ct


@contextlib.contextmanager
def _quiet():
    """Silence coremltools' import-time messages (untested-torch warnings, and one line per
    native proxy it cannot load, which is every one of them off macOS)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _fix_reduce_keepdims():
    """coremltools 9.0 passes its keep_dims constant (a numpy bool) straight to np.sum,
    which numpy >= 2.4 refuses (one of several numpy 2.4 incompatibilities of coremltools
    9.0; apple/coremltools#2633 reports another). Wrap reduce_sum's operator, for the
    process, so that it receives a Python bool; only value inference uses it, and only
    where this numpy needs it."""
    try:
        np.sum(np.zeros(1, np.float16), axis=0, keepdims=np.True_)
        return
    except TypeError:
        pass
    from coremltools.converters.mil.mil.ops.defs.iOS15 import reduction
    cls = reduction.reduce_sum
    if getattr(cls.get_operator, "_anecy_keepdims", False):
        return
    inner = cls.get_operator

    def get_operator(self):
        op = inner(self)
        return lambda x, axis=None, keepdims=False: op(x, axis=axis, keepdims=bool(keepdims))
    get_operator._anecy_keepdims = True
    cls.get_operator = get_operator


def _types():
    from coremltools.converters.mil.mil import types
    return types


# =========================================================================================
# Inputs and the ulp measure
# =========================================================================================

def random_input(kernel: str, cfg, seed: int = 0) -> np.ndarray:
    """A packed fp16 input [1, C, 1, W] for ``kernel`` whose values keep its outputs of
    order one, as in training: activations N(0, 1), weight matrices N(0, 1/C) (C: the
    kernel's input channels), norm weights near 1."""
    lay = layout(kernel, cfg)
    rng = np.random.default_rng(seed)
    C = lay.in_shape[1]
    arrays = {}
    for b in lay.inputs:
        if b.kind == "pad":
            continue
        a = rng.standard_normal(b.array_shape).astype(np.float32)
        if b.kind == "weight":
            a = 1 + 0.1 * a if b.place == "vec" else a / np.sqrt(C)
        arrays[b.name] = a
    return pack_input(kernel, cfg, **arrays).reshape(lay.in_shape)


def _ulp(v) -> float:
    """Spacing of fp16 numbers at |v|."""
    return float(np.spacing(np.float16(abs(float(v)))))


def block_ulps(kernel: str, cfg, got, ref) -> dict[str, float]:
    """Per output block of ``kernel``: max |got - ref| in fp16 ulps of the block's largest
    |ref| (inf if either holds a non-finite value where the other does not)."""
    lay = layout(kernel, cfg)
    _, C, _, S = lay.out_shape
    g = np.asarray(got, np.float32).reshape(C, S)
    r = np.asarray(ref, np.float32).reshape(C, S)
    out = {}
    for name, off, ch in lay.outputs:
        gb, rb = g[off:off + ch], r[off:off + ch]
        if not np.array_equal(np.isfinite(gb), np.isfinite(rb)):
            out[name] = float("inf")
            continue
        fin = np.isfinite(rb)
        if not np.array_equal(gb[~fin], rb[~fin]):
            out[name] = float("inf")
            continue
        scale = float(np.max(np.abs(rb[fin]))) if fin.any() else 0.0
        err = float(np.max(np.abs(gb[fin] - rb[fin]))) if fin.any() else 0.0
        out[name] = err / _ulp(scale)
    return out


# =========================================================================================
# The checks
# =========================================================================================

def write_blobs(program, directory) -> dict[str, Path]:
    """Write ``program``'s blob files as a Core ML package lays them out
    (``@model_path/weights/...`` under ``directory``); returns BLOBFILE path -> file."""
    files = {}
    for path, data in program.blobs.items():
        if not path.startswith("@model_path/"):
            raise CheckFailure(program.kernel, "blobs", f"BLOBFILE path {path!r} is not "
                                                        f"under @model_path/")
        f = Path(directory) / path[len("@model_path/"):]
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
        files[path] = f
    return files


def _read_blob_ct(kernel, file, offset, what):
    from coremltools.libmilstoragepython import _BlobStorageReader
    try:
        raw = _BlobStorageReader(str(file)).read_fp16_data(int(offset))
    except Exception as e:     # the reader raises RuntimeError/ValueError kinds of its own
        raise CheckFailure(kernel, "blobs", f"coremltools cannot read {what} at offset "
                                            f"{offset}: {_one_line(e)}") from None
    return np.asarray(raw).view(np.float16).ravel()


def _one_line(e) -> str:
    s = " ".join(str(e).split())
    return s[:300] if s else type(e).__name__


def _const_value(kernel, st, blob_files, counter):
    """The numpy value of a parsed const statement; BLOBFILE constants are read through
    coremltools' reader and compared with anecy's."""
    v = st.attrs.get("val")
    if v is None:
        raise CheckFailure(kernel, "parse", f"line {st.lineno}: const without val")
    kind = v[0]
    if kind == "bool":
        return np.bool_(v[1])
    if kind == "int32":
        return np.int32(v[1])
    if kind == "fp16":
        return np.float16(v[1])
    if kind == "list":
        dt = {"int32": np.int32, "fp16": np.float16}.get(v[1].dtype)
        if dt is None:
            raise CheckFailure(kernel, "parse", f"line {st.lineno}: inline {v[1]} constant")
        return np.array([float(n) if dt is np.float16 else int(n) for n in v[2]], dt)
    if kind == "blob":
        t, path, offset = v[1], v[2], v[3]
        if path not in blob_files:
            raise CheckFailure(kernel, "blobs", f"line {st.lineno}: BLOBFILE {path!r} is not "
                                                f"in the program's blob set")
        got = _read_blob_ct(kernel, blob_files[path], offset, path)
        try:
            ours = read_blob(blob_files[path].read_bytes(), offset)
        except ValueError as e:
            raise CheckFailure(kernel, "blobs", f"{path}: coremltools reads it but anecy's "
                                                f"reader does not: {e}") from None
        if got.view(np.uint16).tobytes() != ours.view(np.uint16).tobytes():
            raise CheckFailure(kernel, "blobs", f"{path}: coremltools and anecy read "
                                                f"different values")
        need = int(np.prod(t.shape))
        if got.size != need:
            raise CheckFailure(kernel, "blobs", f"line {st.lineno}: {path} holds {got.size} "
                                                f"fp16 values, {t} needs {need}")
        counter[0] += 1
        return got.reshape(t.shape)
    raise CheckFailure(kernel, "parse", f"line {st.lineno}: const of kind {kind!r}")


def _declared(types, t):
    """(coremltools dtype, shape) of a milsim Type."""
    dt = {"fp16": types.fp16, "int32": types.int32, "bool": types.bool}[t.dtype]
    return dt, (() if t.shape is None else tuple(t.shape))


def _inferred(types, var):
    shape = tuple(int(d) for d in var.shape) if var.shape is not None else ()
    return var.dtype, shape


def _type_name(types, dt, shape):
    name = types.builtin_to_string(dt)
    return name if not shape else f"tensor<{name}, {list(shape)}>"


def _rebuild(kernel, parsed, blob_files, x=None):
    """Rebuild ``parsed`` with coremltools' builder; returns (Program, output Var, number of
    blob constants). With ``x`` (fp16 array) the input is a constant, so coremltools'
    value inference computes every op."""
    ct = load_coremltools()
    types = _types()
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program

    opset = getattr(ct.target, _OPSET)
    counter = [0]
    if x is None:
        inputs = {parsed.input_name: mb.placeholder(shape=parsed.input_type.shape,
                                                    dtype=types.fp16)}
    else:
        inputs = {}
    with Function(inputs, opset_version=opset) as func:
        env = dict(func.inputs)
        if x is not None:
            env[parsed.input_name] = mb.const(val=np.asarray(x, np.float16),
                                              name=parsed.input_name)
        for st in parsed.stmts:
            where = f"line {st.lineno} ({st.var} = {st.op})"
            if st.op == "const":
                val = _const_value(kernel, st, blob_files, counter)
                try:
                    var = mb.const(val=val, name=st.var)
                except Exception as e:
                    raise CheckFailure(kernel, "opset", f"{where}: {_one_line(e)}") from None
            else:
                kw = {}
                for pname, ref in st.args.items():
                    refs = ref if isinstance(ref, tuple) else (ref,)
                    missing = [r for r in refs if r not in env]
                    if missing:
                        raise CheckFailure(kernel, "opset", f"{where}: {missing[0]} is not "
                                                            f"defined")
                    vals = tuple(env[r] for r in refs)
                    kw[pname] = vals if isinstance(ref, tuple) else vals[0]
                builder = getattr(mb, st.op, None)
                if builder is None:
                    raise CheckFailure(kernel, "opset", f"{where}: {st.op!r} is not an op of "
                                                        f"the {_OPSET} opset")
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)  # fp16 overflow etc.
                        var = builder(name=st.var, **kw)
                except Exception as e:
                    raise CheckFailure(kernel, "opset", f"{where}: coremltools rejects it: "
                                                        f"{_one_line(e)}") from None
            want = _declared(types, st.decl)
            got = _inferred(types, var)
            if got != want:
                raise CheckFailure(kernel, "types", f"{where}: declared "
                                                    f"{_type_name(types, *want)}, coremltools "
                                                    f"infers {_type_name(types, *got)}")
            env[st.var] = var
        if parsed.output not in env:
            raise CheckFailure(kernel, "opset", f"output {parsed.output!r} is not defined")
        out = env[parsed.output]
        func.set_outputs([out])
    prog = Program()
    prog.add_function("main", func)
    return prog, out, counter[0]


def _write_package(kernel, prog, path: Path) -> Path:
    ct = load_coremltools()
    # ct.convert ends with gc.collect(), which walks every object of the process (0.4 s
    # each once coremltools is imported); frozen objects are skipped, so the collection
    # sees only what the conversion made. unfreeze() hands everything back to the GC.
    gc.freeze()
    try:
        with _quiet():
            model = ct.convert(prog, convert_to="mlprogram",
                               minimum_deployment_target=getattr(ct.target, _OPSET),
                               pass_pipeline=ct.PassPipeline.EMPTY, skip_model_load=True)
            model.save(str(path))
    except Exception as e:
        raise CheckFailure(kernel, "package", f"coremltools cannot serialize it: "
                                              f"{_one_line(e)}") from None
    finally:
        gc.unfreeze()
    return path


# Core ML specification version of the iOS18 / macOS 15 model format
_SPEC_VERSION = 9


def check_package(program, package) -> int:
    """Check the .mlpackage ``package`` written from ``program``: an iOS18 model whose one
    input and one output are fp16 arrays of the program's shapes, and whose stored weights
    read back through coremltools' reader bit for bit equal to the BLOBFILE constants they
    came from. Returns how many weights were compared."""
    ct = load_coremltools()
    from coremltools.proto import FeatureTypes_pb2
    kernel = program.kernel
    parsed = milsim.parse(program.text)
    want = {}
    for st in parsed.stmts:
        v = st.attrs.get("val")
        if st.op == "const" and v is not None and v[0] == "blob":
            want[st.var] = read_blob(program.blobs[v[2]], v[3])
    package = Path(package)
    spec = ct.utils.load_spec(str(package))
    if spec.specificationVersion != _SPEC_VERSION:
        raise CheckFailure(kernel, "package", f"specification version "
                                              f"{spec.specificationVersion}, not "
                                              f"{_SPEC_VERSION} (iOS18)")
    fp16 = FeatureTypes_pb2.ArrayFeatureType.FLOAT16
    for what, feats, name, shape in (("input", spec.description.input, parsed.input_name,
                                      program.input_shape),
                                     ("output", spec.description.output, parsed.output,
                                      program.output_shape)):
        got = [(f.name, f.type.multiArrayType.dataType == fp16,
                tuple(f.type.multiArrayType.shape)) for f in feats]
        if got != [(name, True, tuple(shape))]:
            raise CheckFailure(kernel, "package", f"the model's {what}s are {got}, not one "
                                                  f"fp16 {name} {list(shape)}")
    weights_dir = package / "Data" / "com.apple.CoreML" / "weights"
    seen = set()
    for block in spec.mlProgram.functions["main"].block_specializations.values():
        for op in block.operations:
            if op.type != "const" or not op.attributes["val"].HasField("blobFileValue"):
                continue
            name = op.outputs[0].name
            bf = op.attributes["val"].blobFileValue
            got = _read_blob_ct(kernel, weights_dir / bf.fileName.split("/")[-1], bf.offset,
                                f"the package's {name}")
            w = want.get(name)
            if w is None or got.view(np.uint16).tobytes() != w.view(np.uint16).tobytes():
                raise CheckFailure(kernel, "package", f"stored weight {name} does not read "
                                                      f"back bit for bit")
            seen.add(name)
    missing = sorted(set(want) - seen)
    if missing:
        raise CheckFailure(kernel, "package", f"BLOBFILE constants {missing} are not in the "
                                              f"package's blob file")
    return len(seen)


def check_program(program, cfg=None, x=None, workdir=None, package: bool = True,
                  ref=None) -> ProgramCheck:
    """Check one ``mil.MilProgram`` with coremltools (see the module docstring).

    ``x``: an fp16 input to const-fold on, compared per output block with milsim's result
    (``cfg`` gives the blocks; without it the whole output is one block); ``None`` checks
    types only (fast for full-size models). ``workdir``: where blob files and the package
    go (a temporary directory if None). ``ref``: milsim's output on ``x``, if the caller
    has it already. Raises ``CheckFailure``."""
    load_coremltools()
    kernel = program.kernel
    if workdir is None:
        import tempfile
        with tempfile.TemporaryDirectory(prefix="anecy-coreml-") as tmp:
            return check_program(program, cfg, x, tmp, package, ref)
    workdir = Path(workdir)
    try:
        parsed = milsim.parse(program.text)
    except milsim.MilError as e:
        raise CheckFailure(kernel, "parse", str(e)) from None
    blob_files = write_blobs(program, workdir / f"{kernel}.blobs")
    prog, _, nblobs = _rebuild(kernel, parsed, blob_files)
    res = ProgramCheck(kernel, len(parsed.stmts), nblobs)
    if x is not None:
        x = np.asarray(x, np.float16).reshape(parsed.input_type.shape)
        with np.errstate(all="ignore"):
            _, out, _ = _rebuild(kernel, parsed, blob_files, x)
        got = out.val
        if got is None:
            raise CheckFailure(kernel, "values", "coremltools did not const-fold the output")
        if ref is None:
            try:
                ref = milsim.run(program, x)
            except milsim.MilError as e:
                raise CheckFailure(kernel, "values", f"milsim rejects it: {e}") from None
        if cfg is not None:
            ul = block_ulps(kernel, cfg, got, ref)
        else:
            r = ref.astype(np.float32)
            ul = {"out": float(np.max(np.abs(got.astype(np.float32) - r))) /
                  _ulp(np.max(np.abs(r)))}
        res.value_ulps = ul
        bad = {k: v for k, v in ul.items() if not v <= VALUE_ULPS}
        if bad:
            k, v = max(bad.items(), key=lambda kv: kv[1])
            raise CheckFailure(kernel, "values", f"output block {k} differs from milsim by "
                                                 f"{v:.1f} ulps of its largest value (bound "
                                                 f"{VALUE_ULPS:g})")
    if package:
        res.package = _write_package(kernel, prog, workdir / f"{kernel}.mlpackage")
        res.package_weights = check_package(program, res.package)
    return res


def check_kernel(kernel: str, cfg, seed: int | None = 0, workdir=None,
                 package: bool = True) -> ProgramCheck:
    """``check_program`` on ``mil.generate(kernel, cfg)`` with ``random_input`` (or types
    only when ``seed`` is None)."""
    x = None if seed is None else random_input(kernel, cfg, seed)
    return check_program(mil.generate(kernel, cfg), cfg, x, workdir, package)
