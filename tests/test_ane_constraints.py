"""Every documented ANE constraint (docs/ARCHITECTURE.md section 11) against its check.

For each constraint: the check passes on what anecy builds (every program of every preset,
the Surfaces and requests of a bound AneKernels, the shim's calls), and a mutation that
breaks the constraint is caught by that same check. The programs and requests run here with
stand-in executors (anecy._testing) and the shim through clang and the stub SDK.
"""
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from anecy import ConfigError, Model, ModelConfig, _packed, ane_constraints, ane_health, mil
from anecy._ane_runtime import Surface
from anecy._packed import AneKernels
from anecy._testing import NullAneKernel
from anecy.ane_constraints import CONSTRAINTS, check_bound, check_program, check_programs
from anecy.blob import build_blob
from anecy.config import PRESETS
from anecy.kernel_layout import KERNEL_NAMES
from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tools" / "objc_check" / "check.sh"
SHIM_M = ROOT / "anecy" / "objc" / "ane_shim.m"
TINY = ModelConfig.preset("tiny")


# -----------------------------------------------------------------------------------------
# the table
# -----------------------------------------------------------------------------------------

def test_every_constraint_is_a_row_of_the_architecture_table():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text[text.index("## 11."):]
    rows = {m.group(1) for m in re.finditer(r"^\| `([a-z0-9-]+)` \|", section, re.M)}
    assert rows == {c.key for c in CONSTRAINTS}


# -----------------------------------------------------------------------------------------
# programs: every one anecy.mil emits, then mutations of one
# -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_program_of_every_preset_holds(preset):
    assert check_programs(ModelConfig.preset(preset)) == []


def _mutant(kernel, text=None, blobs=None):
    p = mil.generate(kernel, TINY)
    return mil.MilProgram(kernel, p.text if text is None else text,
                          dict(p.blobs) if blobs is None else blobs, p.input_shape,
                          p.output_shape)


def _insert_before_return(text, line):
    i = text.rindex("    } -> (")
    return text[:i] + line + "\n" + text[i:]


def test_a_gelu_is_caught():
    p = mil.generate("ffnFused", TINY)
    text = _insert_before_return(
        p.text, '        tensor<fp16, [1, 64, 1, 64]> g = gelu(x=x_next)[name=string("g")];')
    assert "x_next" in p.text
    bad = check_program(_mutant("ffnFused", text), TINY)
    assert any("no-gelu" in v and "gelu" in v for v in bad), bad


def test_an_sdpa_op_is_caught():
    p = mil.generate("sdpaFwd", TINY)
    text = _insert_before_return(
        p.text, "        tensor<fp16, [1, 4, 16, 64]> a = scaled_dot_product_attention("
                'query=q,key=k,value=v)[name=string("a")];')
    bad = check_program(_mutant("sdpaFwd", text), TINY)
    assert any("sdpa-mask-ignored" in v and "scaled_dot_product_attention" in v
               for v in bad), bad


def test_a_second_input_is_caught():
    p = mil.generate("woFwd", TINY)
    text = re.sub(r"(func main<ios18>\(tensor<fp16, \[[^\]]*\]> x)\)",
                  r"\1, tensor<fp16, [1, 64, 1, 64]> y)", p.text)
    assert text != p.text
    bad = check_program(_mutant("woFwd", text), TINY)
    assert bad and "single-input" in bad[0] and "exactly one input" in bad[0], bad


def test_a_second_output_is_caught():
    p = mil.generate("woFwd", TINY)
    text = re.sub(r"\} -> \((\w+)\);", r"} -> (\1, x);", p.text)
    assert text != p.text
    bad = check_program(_mutant("woFwd", text), TINY)
    assert bad and "exactly one tensor" in bad[0], bad


def test_a_blobfile_offset_other_than_64_is_caught():
    p = mil.generate("sdpaFwd", TINY)
    text = p.text.replace("offset=uint64(64)", "offset=uint64(128)", 1)
    assert text != p.text
    bad = check_program(_mutant("sdpaFwd", text), TINY)
    assert any("blobfile-offset" in v and "offset 128" in v for v in bad), bad


def test_a_blob_without_its_descriptor_at_64_is_caught():
    p = mil.generate("sdpaFwd", TINY)
    path = next(iter(p.blobs))
    data = bytearray(p.blobs[path])
    data[64:68] = b"\0\0\0\0"              # the DEADBEEF descriptor gone from byte 64
    bad = check_program(_mutant("sdpaFwd", blobs={**p.blobs, path: bytes(data)}), TINY)
    assert any("blobfile-offset" in v and "DEADBEEF" in v for v in bad), bad


def test_a_weight_baked_into_a_program_is_caught():
    p = mil.generate("sdpaFwd", TINY)
    path = next(k for k in p.blobs if k.endswith("mask.bin"))
    rng = np.random.default_rng(0)
    weight = rng.standard_normal(TINY.seq_len ** 2).astype(np.float16)
    bad = check_program(_mutant("sdpaFwd", blobs={**p.blobs, path: build_blob(weight)}), TINY)
    assert any("weights-baked" in v and "mask.bin" in v for v in bad), bad


def test_a_declared_input_the_host_does_not_pack_is_caught():
    p = mil.generate("qBwd", TINY)
    C, W = p.input_shape[1], p.input_shape[3]
    text = p.text.replace(f"tensor<fp16, [1, {C}, 1, {W}]> x)", f"tensor<fp16, [1, {C}, 1, "
                                                                f"{W + 32}]> x)")
    assert text != p.text
    bad = check_program(_mutant("qBwd", text), TINY)
    assert any("packed-buffer" in v and "declares input" in v for v in bad), bad


# -----------------------------------------------------------------------------------------
# Surfaces and requests of a bound AneKernels (stand-in executors)
# -----------------------------------------------------------------------------------------

@pytest.fixture
def fresh_programs():
    _packed.clear_compiled_programs()
    yield
    _packed.clear_compiled_programs()


def _bound(cfg, factory=NullAneKernel):
    """An AneKernels bound to a new model's engine, and the model (its weights, which the
    staging plans read, live as long as it does)."""
    m = Model(cfg, backend="sim", seed=0)
    ane = AneKernels(kernel_factory=factory)
    ane.bind(m.engine)
    return ane, m


@pytest.mark.parametrize("preset", ["tiny", "qwen3-tiny", "stories15m", "stories110m"])
@pytest.mark.usefixtures("fresh_programs")
def test_every_surface_and_request_holds(preset):
    ane, _ = _bound(ModelConfig.preset(preset))
    assert check_bound(ane) == []


@pytest.mark.usefixtures("fresh_programs")
def test_a_surface_under_49152_bytes_is_caught(monkeypatch):
    monkeypatch.setattr(_packed, "MIN_SURFACE_BYTES", 1)
    ane, _ = _bound(TINY)
    bad = check_bound(ane)
    assert any(v.startswith("min-surface: woFwd layer 0 input Surface of 16384 bytes")
               for v in bad), bad


@pytest.mark.usefixtures("fresh_programs")
def test_a_strided_buffer_is_caught(monkeypatch):
    def padded(rows, cols):        # rows padded to a wider stride: not packed data
        s = Surface(max(2 * rows * (cols + 32), _packed.MIN_SURFACE_BYTES))
        return s, s.array(np.float16, (rows, cols + 32))[:, :cols]
    monkeypatch.setattr(_packed, "_fp16_surface", padded)
    ane, _ = _bound(TINY)
    bad = check_bound(ane)
    assert any("packed-buffer" in v and "is not a packed fp16" in v for v in bad), bad


@pytest.mark.usefixtures("fresh_programs")
def test_a_request_bound_to_another_surface_is_caught():
    ane, _ = _bound(TINY)
    ane.requests[1]["woFwd"] = ane.requests[0]["woFwd"]
    bad = check_bound(ane)
    assert bad == ["single-input: woFwd layer 1's request is not bound to its one input and "
                   "one output Surface"]


@pytest.mark.usefixtures("fresh_programs")
def test_rows_narrower_than_32_are_refused():
    short = ModelConfig.preset("tiny", seq_len=16)
    with pytest.raises(ConfigError, match="seq_len >= 32"):
        _bound(short)


# -----------------------------------------------------------------------------------------
# weights are inputs: no compile after an update; the compile budget
# -----------------------------------------------------------------------------------------

class CountingKernel(NullAneKernel):
    made = 0

    def __init__(self, text, blobs, name):
        super().__init__(text, blobs, name)
        type(self).made += 1


@pytest.mark.usefixtures("fresh_programs")
def test_a_weight_update_compiles_nothing():
    counting = type("Counting", (CountingKernel,), {"made": 0})
    ane, m = _bound(TINY, counting)
    assert counting.made == 10
    spent = ane_health.compiles_spent()
    before = ane.input_buffer("woFwd", 0).copy()
    m.params[:] *= 2
    ane.stage_all()
    assert not np.array_equal(ane.input_buffer("woFwd", 0), before)   # new weights staged
    assert counting.made == 10 and ane_health.compiles_spent() == spent


@pytest.mark.usefixtures("fresh_programs")
def test_the_compile_budget_refuses_the_compile_past_it(monkeypatch):
    monkeypatch.setattr(ane_health, "_SPENT", [ane_health.COMPILE_BUDGET - 3])
    counting = type("Counting", (CountingKernel,), {"made": 0})
    with pytest.raises(ane_health.AneFailure) as info:
        _bound(TINY, counting)
    assert counting.made == 3                            # the three within the budget
    msg = str(info.value)
    assert "\n" not in msg
    assert f"would be compile {ane_health.COMPILE_BUDGET + 1} of this process" in msg
    assert "past the ANE's budget of about 119" in msg
    assert info.value.kernel == KERNEL_NAMES[3]


def test_the_constraint_module_names_its_numbers_once():
    assert ane_constraints.MIN_SURFACE_BYTES == _packed.MIN_SURFACE_BYTES
    assert ane_health.COMPILE_BUDGET == 119


# -----------------------------------------------------------------------------------------
# the shim's calls: clang and the stub SDK
# -----------------------------------------------------------------------------------------

def _clang_check(tmp_path, text):
    require_tool("clang", "apt-get update && apt-get install -y clang",
                 "the Objective-C shim is type-checked with it")
    path = tmp_path / "ane_shim.m"
    path.write_text(text)
    return subprocess.run(["bash", str(CHECK), str(path)], capture_output=True, text=True,
                          timeout=300)


SHIM_MUTATIONS = [
    ("miltext-nsdata", "modelWithMILText:weights:optionsPlist:), mil, weights, nil);",
     "modelWithMILText:weights:optionsPlist:), [NSString stringWithUTF8String:mil_text], "
     "weights, nil);",
     "incompatible pointer types passing 'NSString * _Nullable' to parameter of type "
     "'NSData * _Nonnull'"),
    ("weights-dict-not-nil", "modelWithMILText:weights:optionsPlist:), mil, weights, nil);",
     "modelWithMILText:weights:optionsPlist:), mil, nil, nil);",
     "null passed to a callee that requires a non-null argument"),
    ("evaluate-options-not-nil", "@{}, ane_request, &error)", "nil, ane_request, &error)",
     "null passed to a callee that requires a non-null argument"),
    ("load-options-not-nil", "@selector(loadWithQoS:options:error:), ANECY_ANE_QOS, @{},",
     "@selector(loadWithQoS:options:error:), ANECY_ANE_QOS, nil,",
     "null passed to a callee that requires a non-null argument"),
]


@pytest.mark.parametrize("name,good,bad,diagnostic", SHIM_MUTATIONS,
                         ids=[m[0] for m in SHIM_MUTATIONS])
def test_the_shims_calls_hold_and_mutations_are_caught(tmp_path, name, good, bad, diagnostic):
    shim = SHIM_M.read_text()
    assert shim.count(good) == 1, good
    accepted = _clang_check(tmp_path, shim)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    rejected = _clang_check(tmp_path, shim.replace(good, bad))
    assert rejected.returncode != 0, f"clang accepted {bad!r}"
    assert diagnostic in rejected.stderr, rejected.stderr
