"""Apple's coremltools as a second oracle of the ten MIL programs (anecy.coreml_check).

Every program of the presets is rebuilt op by op with coremltools' MIL builder (iOS18
opset): coremltools validates each op, parameter and dtype and infers each type (which
must equal the declared one), reads each BLOBFILE with its own blob reader, const-folds
the program on a random input to values compared with milsim's, and serializes it to an
.mlpackage whose weights must read back bit for bit. The two full-size models get the
type, blob and package checks only (numpy's fp16 matmul has no fast path, and their
products are 7 to 14 times stories15m's, which already takes seconds). The mutation tests
show that each check fails when it should.

The value bound, VALUE_ULPS = 2 fp16 ulps of each output block's largest value: milsim and
coremltools both keep every intermediate in fp16, and the elementwise ops (add, mul, sub,
pow) are computed in fp32 and rounded once by both, so they give the same bits from the
same inputs (but for fp32 library differences in pow, which rarely move an fp16
rounding). They differ where an op rounds differently:
numpy's fp16 matmul and reduce_sum sum in their own order, and coremltools evaluates
sigmoid as 1/(1+exp(-x)) and softmax step by step with an fp16 rounding after each step,
where milsim rounds once. Each such op moves its result by about one rounding, one ulp
of the values it produces. An output element then differs by (a) its own last rounding,
which can fall on either side of a rounding boundary: 1 ulp of the element, at most 1 ulp
of the block's largest value; plus (b) what the upstream differences carry to it: the
products and contractions downstream carry a relative difference at its size, not above
it, and the independent differences of the many terms of a contraction have random signs,
so they average rather than add: about 1 ulp of the block's scale. Hence 2. The bound is
per block and relative to the block's largest value because an element's error is set by
the operands it was computed from, not by its own size (sdpaBwd2's dprobs - rowsum
cancels; probs and dprobs blocks differ in scale). Measured over 40 seeds each of tiny,
qwen3-tiny and the two EXTRA configs (and 3 of stories15m), the worst is exactly 2, reached
after the sigmoid (ffnFused's gate and x_next) and after QK-norm's reduce_sum (sdpaFwd's
q_rope), and never exceeded; 1 elsewhere. A wrong op, parameter, axis or layout errs by
O(1) of the block's scale, i.e. by hundreds of ulps, and even a 1% error in one op is
seen (test_value_check_sees_a_small_error).
"""

import dataclasses

import numpy as np
import pytest

from anecy import coreml_check as cc
from anecy import mil, milsim
from anecy.blob import BLOB_DESCRIPTOR_OFFSET
from anecy.config import ModelConfig
from anecy.errors import BackendUnavailable
from anecy.kernel_layout import KERNEL_NAMES, input_shape, layout, rope_tables
from conftest import require

VALUE_PRESETS = ("tiny", "qwen3-tiny", "stories15m")
SHAPE_PRESETS = ("stories110m", "qwen3-0.6b")
# not among the presets: a residual scale (ffnFused's extra mul), head_dim != dim / heads,
# GQA 3:1 with QK-norm and interleaved RoPE at an odd, short sequence length
EXTRA = {
    "gqa-scaled": dict(dim=64, hidden_dim=96, n_layers=1, n_heads=8, n_kv_heads=2,
                       head_dim=24, vocab_size=32, seq_len=32, residual_scale=0.5),
    "odd": dict(dim=20, hidden_dim=40, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=6,
                vocab_size=8, seq_len=5, qk_norm=True, rope_style="interleaved",
                residual_scale=0.3),
}


@pytest.fixture(scope="module", autouse=True)
def coremltools():
    try:
        return cc.load_coremltools()
    except BackendUnavailable:
        require(False, "the Python package 'coremltools' (Apple's MIL toolchain, the oracle "
                       "of these tests)", 'run `pip install -e ".[test]"`')


def _config(name):
    return ModelConfig(**EXTRA[name]) if name in EXTRA else ModelConfig.preset(name)


def _assert_checked(res, prog, cfg, values):
    n_stmts = sum(1 for line in prog.text.split("\n") if "= " in line and "[name=" in line)
    assert res.kernel == prog.kernel and res.ops == n_stmts
    assert res.blobs == prog.text.count("BLOBFILE") == len(prog.blobs)
    # every blob constant is stored in the package's weight file and read back bit for bit
    assert res.package is not None and (res.package / "Manifest.json").is_file()
    assert res.package_weights == res.blobs
    if values:
        blocks = [name for name, _, _ in layout(prog.kernel, cfg).outputs]
        assert sorted(res.value_ulps) == sorted(blocks)
        worst = max(res.value_ulps.values())
        assert worst <= cc.VALUE_ULPS, (prog.kernel, res.value_ulps)
    else:
        assert res.value_ulps is None


@pytest.mark.parametrize("name", VALUE_PRESETS + tuple(EXTRA))
def test_every_program_passes_coremltools_with_milsims_values(name, tmp_path):
    cfg = _config(name)
    for kernel in KERNEL_NAMES:
        prog = mil.generate(kernel, cfg)
        x = cc.random_input(kernel, cfg, seed=0)
        res = cc.check_program(prog, cfg, x, tmp_path / kernel)
        _assert_checked(res, prog, cfg, values=True)


@pytest.mark.parametrize("name", SHAPE_PRESETS)
def test_full_size_programs_pass_coremltools_types(name, tmp_path):
    cfg = ModelConfig.preset(name)
    for kernel in KERNEL_NAMES:
        res = cc.check_kernel(kernel, cfg, seed=None, workdir=tmp_path / kernel)
        _assert_checked(res, mil.generate(kernel, cfg), cfg, values=False)


def test_blobs_read_the_same_through_coremltools(tmp_path):
    from coremltools.libmilstoragepython import _BlobStorageReader
    cfg = ModelConfig.preset("qwen3-tiny")
    prog = mil.generate("sdpaFwd", cfg)
    files = cc.write_blobs(prog, tmp_path)
    assert sorted(files) == sorted(prog.blobs)
    cos, _ = rope_tables(cfg)
    f = files["@model_path/weights/rope_cos.bin"]
    assert f == tmp_path / "weights" / "rope_cos.bin"
    got = np.asarray(_BlobStorageReader(str(f)).read_fp16_data(BLOB_DESCRIPTOR_OFFSET))
    assert got.view(np.float16).tobytes() == cos.tobytes()


def test_random_input_keeps_outputs_of_order_one():
    cfg = ModelConfig.preset("stories15m")
    for kernel in ("ffnFused", "sdpaFwd"):
        x = cc.random_input(kernel, cfg, seed=3)
        assert x.shape == input_shape(kernel, cfg) and x.dtype == np.float16
        y = milsim.run(mil.generate(kernel, cfg), x)
        assert np.all(np.isfinite(y)) and 0.5 < np.max(np.abs(y)) < 200
    assert not np.array_equal(cc.random_input("woFwd", cfg, 0), cc.random_input("woFwd", cfg, 1))


# -----------------------------------------------------------------------------------------
# the checks can fail
# -----------------------------------------------------------------------------------------

TINY = ModelConfig.preset("tiny")


def _mutant(kernel, old, new):
    prog = mil.generate(kernel, TINY)
    assert prog.text.count(old) == 1, old
    return dataclasses.replace(prog, text=prog.text.replace(old, new))


def _fails(prog, stage, *words, x=True):
    milsim.parse(prog.text)      # syntax is fine: coremltools, not the parser, must object
    with pytest.raises(cc.CheckFailure) as info:
        cc.check_program(prog, TINY, cc.random_input(prog.kernel, TINY, 0) if x else None)
    e = info.value
    assert e.kernel == prog.kernel and e.stage == stage, str(e)
    msg = str(e)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def test_unmutated_programs_pass():
    for kernel in ("woFwd", "sdpaFwd", "ffnFused"):
        cc.check_program(mil.generate(kernel, TINY), TINY,
                         cc.random_input(kernel, TINY, 0), package=False)


def test_a_renamed_parameter_is_reported():
    prog = _mutant("woFwd", "transpose_y=", "transpose_b=")
    _fails(prog, "opset", "p_mm = matmul", "transpose_b")


def test_a_wrong_dtype_is_reported():
    # the attention scale as an int32: coremltools' mul wants both operands fp16
    prog = _mutant("sdpaFwd", 'fp16 scale = const()[name=string("scale"), val=fp16(0.25)]',
                   'int32 scale = const()[name=string("scale"), val=int32(1)]')
    _fails(prog, "opset", "q_scaled = mul", "int32")


def test_a_wrong_declared_shape_is_reported():
    prog = _mutant("woFwd", "tensor<fp16, [1,1,64,64]> a_t = ", "tensor<fp16, [1,1,64,32]> a_t = ")
    _fails(prog, "types", "a_t = transpose", "declared tensor<fp16, [1, 1, 64, 32]>",
           "infers tensor<fp16, [1, 1, 64, 64]>", x=False)


def test_a_bad_reshape_is_reported():
    # half the values the reshape needs
    prog = _mutant("woFwd", "([1,1,64,64])", "([1,1,64,32])")
    _fails(prog, "opset", "a_r = reshape")


@pytest.mark.parametrize("byte,what", [(4, "file format version"), (64, "sentinel"),
                                       (68, "data type"), (72, "index out of bounds"),
                                       (80, "index out of bounds")])
def test_a_corrupt_blob_is_reported(byte, what):
    # the file's format version, the descriptor's DEADBEEF sentinel, its data type, the
    # payload size and the payload offset: coremltools' own reader refuses each
    prog = mil.generate("sdpaFwd", TINY)
    path = "@model_path/weights/mask.bin"
    data = bytearray(prog.blobs[path])
    data[byte] ^= 0x10
    blobs = dict(prog.blobs, **{path: bytes(data)})
    _fails(dataclasses.replace(prog, blobs=blobs), "blobs", "coremltools cannot read",
           "mask.bin", what)


def test_a_package_that_does_not_match_its_program_is_reported(tmp_path):
    prog = mil.generate("sdpaFwd", TINY)
    res = cc.check_program(prog, TINY, None, tmp_path)
    assert cc.check_package(prog, res.package) == 3
    # the package's input and output are what the program (and the ANE) take and give
    other = dataclasses.replace(prog, output_shape=(1, 1, 1, 1))
    with pytest.raises(cc.CheckFailure, match="package: the model's outputs are .* not one "
                                              r"fp16 out \[1, 1, 1, 1\]"):
        cc.check_package(other, res.package)
    weights = res.package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0x01                  # the last fp16 value of the last stored weight
    weights.write_bytes(bytes(data))
    with pytest.raises(cc.CheckFailure, match="package: stored weight .* bit for bit"):
        cc.check_package(prog, res.package)


def test_value_check_sees_a_small_error(monkeypatch):
    """A 1% error in milsim's sigmoid (an oracle bug, not a program bug) is caught."""
    sigmoid = milsim._OPS["sigmoid"]

    def biased(p):
        return sigmoid.compute(p) * np.float32(1 + 2 ** -7)
    monkeypatch.setitem(milsim._OPS, "sigmoid", dataclasses.replace(sigmoid, compute=biased))
    prog = mil.generate("ffnFused", TINY)
    msg = _fails(prog, "values", "output block", "bound 2")
    assert "block gate" in msg or "block x_next" in msg, msg
