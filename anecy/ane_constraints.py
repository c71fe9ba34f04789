"""The Apple Neural Engine's documented constraints, as checks of what anecy hands it.

Public ANE work has written down what the hardware and its private API refuse or get
silently wrong: maderix/ANE (README "Limitations", training/training_dynamic) and
mechramc/Orion (docs/ane_constraints.md, constraints #1-#14). ``CONSTRAINTS`` lists them
with the check that holds anecy to each; docs/ARCHITECTURE.md section 11 is the same table
with its sources, and tests/test_ane_constraints.py breaks each constraint on purpose and
sees its check catch it. The checks here are plain functions over what anecy builds:

- ``check_program(program, cfg)``: a MIL program of ``anecy.mil`` (every one is checked
  for every preset in the tests): one input and one output (so no input or output order
  can be wrong, and no multi-buffer size rule applies), no op outside the subset milsim
  knows (no ``gelu``, no SDPA op), the declared input and output shapes of the layout
  table (what the host packs is what the program reads), every BLOBFILE at offset 64 with
  its descriptor there, and no constant but the shape's causal mask and RoPE tables (no
  weight is baked in).
- ``check_bound(kernels)``: the Surfaces and requests an ``AneKernels`` built at bind:
  every Surface at least ``MIN_SURFACE_BYTES``, every buffer a packed view at the start of
  its Surface with the program's declared shape, one request per (kernel, layer) with one
  input and one output Surface, seq_len at least 32.

Each returns a list of violations (empty: none), one line each, naming the constraint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from . import milsim
from .blob import BLOB_DESCRIPTOR_OFFSET, read_blob
from .kernel_layout import KERNEL_NAMES, causal_mask, input_shape, output_shape, rope_tables

__all__ = ["Constraint", "CONSTRAINTS", "ALLOWED_OPS", "FORBIDDEN_OPS", "MIN_SURFACE_BYTES",
           "MIN_SEQ_LEN", "check_program", "check_programs", "check_bound"]

# Ops the programs may use: milsim's subset, every one of which the public reference's
# training programs run on hardware (maderix/ANE training_dynamic/mil_dynamic.h).
ALLOWED_OPS = frozenset(milsim.OPS)
# Reported to fail or to be wrong on the ANE: gelu does not compile (Orion #10); the SDPA
# op ignores its causal mask (maderix/ANE README; Orion #6).
FORBIDDEN_OPS = frozenset({"gelu", "scaled_dot_product_attention"})
# Surfaces smaller than this fail at evaluation (Orion #4: [768, 16] fp16 = 49152 bytes).
MIN_SURFACE_BYTES = 49152
# Rows of a [1, C, 1, W] surface are padded to 32 elements (the ANEgpt fork, via the
# public reference), so anecy's ane backend needs seq_len >= 32.
MIN_SEQ_LEN = 32


@dataclass(frozen=True)
class Constraint:
    """One documented constraint: ``key`` (the row of docs/ARCHITECTURE.md section 11),
    its ``source``, and ``check``: what holds anecy to it, or why nothing can here."""
    key: str
    source: str
    check: str


CONSTRAINTS = (
    Constraint("no-concat", "Orion #1", "not checkable off-device: the public reference's "
               "programs concat on hardware; a compile failure falls back"),
    Constraint("uniform-output-sizes", "Orion #2", "check_program: one output"),
    Constraint("output-order", "Orion #3", "check_program: one output"),
    Constraint("min-surface", "Orion #4", "check_bound: every Surface >= 49152 bytes"),
    Constraint("compile-budget", "maderix README; Orion #5", "ane_health.spend_compile"),
    Constraint("sdpa-mask-ignored", "maderix README; Orion #6",
               "check_program: no SDPA op (causality: the sim backend against cpu)"),
    Constraint("weights-baked", "maderix m5result; Orion #7",
               "check_program: only the mask and RoPE tables are constants; no compile "
               "after a weight update"),
    Constraint("blobfile-offset", "Orion #8", "check_program: offset 64, descriptor there"),
    Constraint("miltext-nsdata", "Orion #9", "clang on the shim: the descriptor's typed "
               "signature takes NSData"),
    Constraint("weights-dict-not-nil", "Orion #11", "clang on the shim: _Nonnull "
               "dictionaries in the typed signatures"),
    Constraint("uniform-input-sizes", "Orion #12", "check_program: one input"),
    Constraint("input-order", "Orion #13", "check_program: one input"),
    Constraint("packed-buffer", "Orion #14", "check_bound: packed views at offset 0 with "
               "the declared shapes"),
    Constraint("single-input", "maderix README", "check_program (milsim's parser): one input"),
    Constraint("no-gelu", "Orion #10", "check_program: op subset"),
    Constraint("fp16-underflow", "maderix README", "tests/test_sim.py: loss scaling"),
    Constraint("rows-of-32", "ANEgpt fork via maderix/ANE", "check_bound; AneKernels "
               "refuses seq_len < 32"),
    Constraint("shared-surface", "anecy's own assumption (unverified)",
               "ane_health's probe on a Mac; here with stand-ins"),
)


# =========================================================================================
# Programs
# =========================================================================================

_BLOBFILE = re.compile(r'BLOBFILE\(path=string\("(?P<path>[^"]*)"\), *'
                       r'offset=uint64\((?P<off>\d+)\)\)')


def _constant_tables(cfg) -> list[np.ndarray]:
    """The only constants a program may hold: the shape's causal mask and RoPE tables."""
    cos, sin = rope_tables(cfg)
    return [causal_mask(cfg.seq_len).ravel(), cos.ravel(), sin.ravel()]


def check_program(program, cfg) -> list[str]:
    """The violations of the documented constraints by one MIL program (an
    ``anecy.mil.MilProgram``) for ``cfg``."""
    k = program.kernel
    bad = []
    try:
        parsed = milsim.parse(program.text)     # refuses a second input or output
    except milsim.MilError as e:
        return [f"{k}: single-input / one output: {e}"]
    ops = {st.op for st in parsed.stmts}
    for op in sorted(ops & FORBIDDEN_OPS):
        bad.append(f"{k}: no-gelu / sdpa-mask-ignored: uses {op}")
    for op in sorted(ops - ALLOWED_OPS - FORBIDDEN_OPS):
        bad.append(f"{k}: op subset: uses {op}, which no program run on hardware uses")
    if parsed.input_type.shape != tuple(input_shape(k, cfg)):
        bad.append(f"{k}: packed-buffer: declares input {parsed.input_type.shape}, the host "
                   f"packs {input_shape(k, cfg)}")
    try:
        out = milsim.check(program)
    except milsim.MilError as e:
        bad.append(f"{k}: does not type-check: {e}")
    else:
        if out.shape != tuple(output_shape(k, cfg)):
            bad.append(f"{k}: packed-buffer: returns {out.shape}, the host reads "
                       f"{output_shape(k, cfg)}")
    refs = {}
    for m in _BLOBFILE.finditer(program.text):
        refs[m.group("path")] = int(m.group("off"))
    if program.text.count("BLOBFILE(") != len(_BLOBFILE.findall(program.text)):
        bad.append(f"{k}: blobfile-offset: a BLOBFILE reference is not path=string(...), "
                   "offset=uint64(...)")
    tables = _constant_tables(cfg)
    for path, off in sorted(refs.items()):
        if off != BLOB_DESCRIPTOR_OFFSET:
            bad.append(f"{k}: blobfile-offset: {path} at offset {off}, not "
                       f"{BLOB_DESCRIPTOR_OFFSET}")
        data = program.blobs.get(path)
        if data is None:
            bad.append(f"{k}: blobfile-offset: {path} is not among the program's blobs")
            continue
        try:
            values = read_blob(data, BLOB_DESCRIPTOR_OFFSET)
        except ValueError as e:
            bad.append(f"{k}: blobfile-offset: {path}: {e}")
            continue
        if not any(values.shape == t.shape and np.array_equal(values.view(np.uint16),
                                                              t.view(np.uint16))
                   for t in tables):
            bad.append(f"{k}: weights-baked: constant {path} is neither the causal mask nor "
                       "a RoPE table (weights must be inputs)")
    for path in sorted(set(program.blobs) - set(refs)):
        bad.append(f"{k}: blobfile-offset: blob {path} is not referenced by the program")
    return bad


def check_programs(cfg) -> list[str]:
    """check_program over the ten programs ``anecy.mil`` emits for ``cfg``."""
    from . import mil
    return [v for k in KERNEL_NAMES for v in check_program(mil.generate(k, cfg), cfg)]


# =========================================================================================
# Surfaces and requests
# =========================================================================================

def _view_ok(surface, buf, shape):
    return (buf.shape == tuple(shape) and buf.dtype == np.float16
            and buf.flags["C_CONTIGUOUS"]
            and buf.__array_interface__["data"][0] == surface.address)


def check_bound(kernels) -> list[str]:
    """The violations by the Surfaces and requests of a bound ``AneKernels`` (or the
    Surfaces of a ``SimKernels``, which shares them)."""
    cfg = kernels.config
    L = cfg.n_layers
    bad = []
    if cfg.seq_len < MIN_SEQ_LEN:
        bad.append(f"rows-of-32: seq_len {cfg.seq_len} < {MIN_SEQ_LEN}")
    for k in KERNEL_NAMES:
        _, C, _, W = input_shape(k, cfg)
        _, C2, _, S = output_shape(k, cfg)
        for l in range(L):
            for what, s, buf, shape in (
                    ("input", kernels.input_surface(k, l), kernels.input_buffer(k, l), (C, W)),
                    ("output", kernels.output_surface(k, l), kernels.output_buffer(k, l),
                     (C2, S))):
                if s.nbytes < MIN_SURFACE_BYTES:
                    bad.append(f"min-surface: {k} layer {l} {what} Surface of {s.nbytes} "
                               f"bytes < {MIN_SURFACE_BYTES}")
                if s.nbytes < 2 * shape[0] * shape[1]:
                    bad.append(f"packed-buffer: {k} layer {l} {what} Surface of {s.nbytes} "
                               f"bytes cannot hold {shape} fp16")
                if not _view_ok(s, buf, shape):
                    bad.append(f"packed-buffer: {k} layer {l} {what} is not a packed fp16 "
                               f"{shape} at the start of its Surface")
    requests = getattr(kernels, "requests", None)
    if requests is not None:
        for k in KERNEL_NAMES:
            for l in range(L):
                weighted = k in requests[l]
                req = requests[l][k] if weighted else kernels.shared_requests.get(k)
                if req is None:
                    bad.append(f"single-input: {k} layer {l} has no request")
                    continue
                if req.input is not kernels.input_surface(k, l) \
                        or req.output is not kernels.output_surface(k, l):
                    bad.append(f"single-input: {k} layer {l}'s request is not bound to its "
                               "one input and one output Surface")
                if not weighted:
                    break       # one request for every layer
    return bad
