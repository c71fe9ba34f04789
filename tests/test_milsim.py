"""The MIL interpreter: fp16 semantics, strictness (each rejection names its line), and
shape-only checking of the full-size programs."""

import time

import numpy as np
import pytest

from anecy import mil
from anecy.blob import build_blob
from anecy.config import ModelConfig
from anecy.kernel_layout import KERNEL_NAMES, input_shape, output_shape
from anecy.milsim import Interpreter, MilError, check, parse, run

QWEN3_06B = ModelConfig(dim=1024, hidden_dim=3072, n_layers=28, n_heads=16, n_kv_heads=8,
                        head_dim=128, vocab_size=151936, seq_len=256, norm_eps=1e-6,
                        rope_theta=1e6, rope_style="half", qk_norm=True)

MASK_PATH = "@model_path/weights/m.bin"

# A small hand-written program (not from anecy.mil): y = W^T a + m, then a few element-wise
# ops.  Input [1, 4, 1, 12]: columns 0..7 hold a [4, 8], columns 8..11 hold W [4, 4].
BASE = [
    'program(1.3)',
    '[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}})]',
    '{',
    '    func main<ios18>(tensor<fp16, [1, 4, 1, 12]> x) {',
    '        tensor<int32, [4]> b0 = const()[name=string("b0"), val=tensor<int32, [4]>([0,0,0,0])];',
    '        tensor<int32, [4]> sa = const()[name=string("sa"), val=tensor<int32, [4]>([1,4,1,8])];',
    '        tensor<fp16, [1,4,1,8]> a = slice_by_size(x=x,begin=b0,size=sa)[name=string("a")];',
    '        tensor<int32, [4]> b1 = const()[name=string("b1"), val=tensor<int32, [4]>([0,0,0,8])];',
    '        tensor<int32, [4]> sw = const()[name=string("sw"), val=tensor<int32, [4]>([1,4,1,4])];',
    '        tensor<fp16, [1,4,1,4]> w = slice_by_size(x=x,begin=b1,size=sw)[name=string("w")];',
    '        tensor<int32, [4]> r1 = const()[name=string("r1"), val=tensor<int32, [4]>([1,1,4,8])];',
    '        tensor<fp16, [1,1,4,8]> a2 = reshape(shape=r1,x=a)[name=string("a2")];',
    '        tensor<int32, [4]> r2 = const()[name=string("r2"), val=tensor<int32, [4]>([1,1,4,4])];',
    '        tensor<fp16, [1,1,4,4]> w2 = reshape(shape=r2,x=w)[name=string("w2")];',
    '        bool bt = const()[name=string("bt"), val=bool(true)];',
    '        bool bf = const()[name=string("bf"), val=bool(false)];',
    '        tensor<fp16, [1,1,4,8]> y = matmul(transpose_x=bt,transpose_y=bf,x=w2,y=a2)[name=string("y")];',
    '        tensor<fp16, [1,1,4,8]> m = const()[name=string("m"), val=tensor<fp16, [1,1,4,8]>(BLOBFILE(path=string("@model_path/weights/m.bin"), offset=uint64(64)))];',
    '        tensor<fp16, [1,1,4,8]> z = add(x=y,y=m)[name=string("z")];',
    '        fp16 h = const()[name=string("h"), val=fp16(0.5)];',
    '        tensor<fp16, [1,1,4,8]> zh = mul(x=z,y=h)[name=string("zh")];',
    '        tensor<fp16, [1,1,4,8]> sg = sigmoid(x=zh)[name=string("sg")];',
    '        tensor<fp16, [1,1,4,8]> d = sub(x=sg,y=zh)[name=string("d")];',
    '        int32 ax = const()[name=string("ax"), val=int32(-1)];',
    '        tensor<fp16, [1,1,4,8]> sm = softmax(axis=ax,x=d)[name=string("sm")];',
    '        tensor<int32, [1]> rx = const()[name=string("rx"), val=tensor<int32, [1]>([3])];',
    '        tensor<fp16, [1,1,4,1]> rs = reduce_sum(axes=rx,keep_dims=bt,x=z)[name=string("rs")];',
    '        tensor<fp16, [1,1,4,1]> ab = mul(x=rs,y=rs)[name=string("ab")];',
    '        fp16 nh = const()[name=string("nh"), val=fp16(-0.5)];',
    '        tensor<fp16, [1,1,4,1]> pw = pow(x=ab,y=nh)[name=string("pw")];',
    '        tensor<fp16, [1,1,4,8]> sc = mul(x=sm,y=pw)[name=string("sc")];',
    '        tensor<int32, [4]> pm = const()[name=string("pm"), val=tensor<int32, [4]>([0,1,3,2])];',
    '        tensor<fp16, [1,1,8,4]> zt = transpose(perm=pm,x=z)[name=string("zt")];',
    '        tensor<int32, [4]> r3 = const()[name=string("r3"), val=tensor<int32, [4]>([1,1,4,8])];',
    '        tensor<fp16, [1,1,4,8]> zr = reshape(shape=r3,x=zt)[name=string("zr")];',
    '        int32 c2 = const()[name=string("c2"), val=int32(2)];',
    '        tensor<fp16, [1,1,12,8]> cat = concat(axis=c2,interleave=bf,values=(sc,zr,z))[name=string("cat")];',
    '        tensor<int32, [4]> r4 = const()[name=string("r4"), val=tensor<int32, [4]>([1,12,1,8])];',
    '        tensor<fp16, [1,12,1,8]> out = reshape(shape=r4,x=cat)[name=string("out")];',
    '    } -> (out);',
    '}',
]


def line_of(lines, fragment):
    hits = [i + 1 for i, line in enumerate(lines) if fragment in line]
    assert len(hits) == 1, fragment
    return hits[0]


def base_blobs():
    m = (np.arange(32).reshape(4, 8) % 3 - 1).astype(np.float16)
    return {MASK_PATH: build_blob(m)}, m


def base_input(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((4, 12)) * 2).astype(np.float16)


def r16(a):
    """One rounding to fp16, as every op does."""
    return np.asarray(a, np.float32).astype(np.float16)


def f(a):
    return np.asarray(a).astype(np.float32)


def expected_base(x, m):
    a, w = x[:, :8], x[:, 8:]
    y = r16(f(w).T @ f(a))
    z = r16(f(y) + f(m))
    zh = r16(f(z) * np.float32(0.5))
    sg = r16(1 / (1 + np.exp(-f(zh))))
    d = r16(f(sg) - f(zh))
    e = np.exp(f(d) - f(d).max(axis=1, keepdims=True))
    sm = r16(e / e.sum(axis=1, keepdims=True))
    rs = r16(f(z).sum(axis=1, keepdims=True))
    ab = r16(f(rs) * f(rs))
    pw = r16(np.power(f(ab), np.float32(-0.5)))
    sc = r16(f(sm) * f(pw))
    zr = z.T.reshape(4, 8)
    return np.concatenate([sc, zr, z], axis=0).reshape(1, 12, 1, 8)


def test_base_program_runs_with_fp16_semantics():
    blobs, m = base_blobs()
    text = "\n".join(BASE)
    x = base_input()
    out = run(text, x, blobs=blobs)
    assert out.dtype == np.float16 and out.shape == (1, 12, 1, 8)
    want = expected_base(x, m)
    exact = [slice(4, 12)]       # data movement and add/mul/matmul are bit-exact
    assert np.array_equal(out[:, exact[0]], want[:, exact[0]])
    # transcendental ops may differ in the last place of their fp32 result: one fp16 ulp
    assert np.allclose(f(out), f(want), rtol=2 ** -10, atol=0)
    assert str(check(text, blobs)) == "tensor<fp16, [1,12,1,8]>"
    # [C, W] input accepted as well as [1, C, 1, W]
    assert np.array_equal(run(text, x.reshape(1, 4, 1, 12), blobs=blobs), out)


def test_each_op_rounds_its_result_to_fp16():
    """(x*y)+z rounds after the mul: the result differs from a fused fp32 evaluation."""
    lines = [
        'program(1.3)', '[buildInfo = dict<string, string>({})]', '{',
        '    func main<ios18>(tensor<fp16, [1, 3, 1, 64]> x) {',
        '        tensor<int32, [4]> s = const()[name=string("s"), val=tensor<int32, [4]>([1,1,1,64])];',
        '        tensor<int32, [4]> b0 = const()[name=string("b0"), val=tensor<int32, [4]>([0,0,0,0])];',
        '        tensor<int32, [4]> b1 = const()[name=string("b1"), val=tensor<int32, [4]>([0,1,0,0])];',
        '        tensor<int32, [4]> b2 = const()[name=string("b2"), val=tensor<int32, [4]>([0,2,0,0])];',
        '        tensor<fp16, [1,1,1,64]> p = slice_by_size(x=x,begin=b0,size=s)[name=string("p")];',
        '        tensor<fp16, [1,1,1,64]> q = slice_by_size(x=x,begin=b1,size=s)[name=string("q")];',
        '        tensor<fp16, [1,1,1,64]> r = slice_by_size(x=x,begin=b2,size=s)[name=string("r")];',
        '        tensor<fp16, [1,1,1,64]> pq = mul(x=p,y=q)[name=string("pq")];',
        '        tensor<fp16, [1,1,1,64]> out = add(x=pq,y=r)[name=string("out")];',
        '    } -> (out);', '}']
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float16)
    out = run("\n".join(lines), x).reshape(64)
    stepwise = r16(f(r16(f(x[0]) * f(x[1]))) + f(x[2]))
    fused = r16(f(x[0]) * f(x[1]) + f(x[2]))
    assert np.array_equal(out, stepwise)
    assert not np.array_equal(out, fused)
    # and overflow behaves as fp16 does
    big = np.full((3, 64), 300, np.float16)
    assert np.all(np.isinf(run("\n".join(lines), big)))


def test_interpreter_runs_many_times_and_checks_input():
    blobs, m = base_blobs()
    it = Interpreter("\n".join(BASE), blobs)
    for seed in range(3):
        x = base_input(seed)
        assert np.allclose(f(it.run(x)), f(expected_base(x, m)), rtol=2 ** -10, atol=0)
    with pytest.raises(ValueError):
        it.run(base_input().astype(np.float32))
    with pytest.raises(ValueError):
        it.run(np.zeros((4, 11), np.float16))


# ------------------------------------------------------------------------------------------
# rejections, each naming its line
# ------------------------------------------------------------------------------------------

def mutate(fragment, new_line=None, transform=None):
    lines = list(BASE)
    n = line_of(lines, fragment)
    lines[n - 1] = new_line if new_line is not None else transform(lines[n - 1])
    return lines, n


def rejected(lines, blobs=None, must_say=""):
    if blobs is None:
        blobs = base_blobs()[0]
    with pytest.raises(MilError) as e:
        check("\n".join(lines), blobs)
    msg = str(e.value)
    assert isinstance(e.value, ValueError)
    assert must_say in msg, msg
    return msg


def test_wrong_declared_shape():
    lines, n = mutate("a2 = reshape", transform=lambda s: s.replace("[1,1,4,8]> a2", "[1,1,8,4]> a2"))
    assert f"line {n}:" in rejected(lines, must_say="declared")


def test_wrong_declared_dtype():
    lines, n = mutate("bool bt =", transform=lambda s: s.replace("bool bt", "int32 bt"))
    assert f"line {n}:" in rejected(lines)


def test_unknown_op():
    lines, n = mutate("sg = sigmoid", transform=lambda s: s.replace("sigmoid(", "gelu("))
    assert f"line {n}:" in rejected(lines, must_say="unknown op")


def test_unknown_attribute():
    lines, n = mutate("z = add", transform=lambda s: s.replace('[name=string("z")]',
                                                               '[name=string("z"), fast=bool(true)]'))
    assert f"line {n}:" in rejected(lines, must_say="unknown attribute")


def test_unknown_parameter():
    lines, n = mutate("z = add", transform=lambda s: s.replace("add(x=y,y=m)", "add(x=y,y=m,alpha=h)"))
    assert f"line {n}:" in rejected(lines, must_say="unknown parameter")


def test_duplicate_name():
    lines, n = mutate("zh = mul", transform=lambda s: s.replace("zh =", "z =").replace('"zh"', '"z"'))
    msg = rejected(lines, must_say="already defined")
    assert f"line {n}:" in msg and f"line {line_of(BASE, 'z = add')}" in msg


def test_undefined_variable():
    lines, n = mutate("sg = sigmoid", transform=lambda s: s.replace("x=zh", "x=zq"))
    assert f"line {n}:" in rejected(lines, must_say="not defined")
    lines, n = mutate("} -> (out);", new_line="    } -> (nope);")
    assert f"line {n}:" in rejected(lines, must_say="not defined")


def test_missing_blob():
    lines = list(BASE)
    n = line_of(lines, "BLOBFILE")
    assert f"line {n}:" in rejected(lines, blobs={}, must_say="not in the blob set")


def test_blob_of_wrong_size():
    n = line_of(BASE, "BLOBFILE")
    small = {MASK_PATH: build_blob(np.zeros(31, np.float16))}
    assert f"line {n}:" in rejected(BASE, blobs=small, must_say="31")
    truncated = {MASK_PATH: build_blob(np.zeros(32, np.float16))[:-2]}
    assert f"line {n}:" in rejected(BASE, blobs=truncated)


def test_blob_with_bad_header():
    n = line_of(BASE, "BLOBFILE")
    blob = bytearray(build_blob(np.zeros(32, np.float16)))
    blob[64] = 0
    assert f"line {n}:" in rejected(BASE, blobs={MASK_PATH: bytes(blob)}, must_say="DEADBEEF")


def test_name_attribute_must_match_variable():
    lines, n = mutate("d = sub", transform=lambda s: s.replace('name=string("d")', 'name=string("dd")'))
    assert f"line {n}:" in rejected(lines, must_say="differs")


def test_shape_errors_in_ops():
    cases = [
        ("a2 = reshape", lambda s: s.replace("shape=r1", "shape=r2")),         # element count
        ("y = matmul", lambda s: s.replace("transpose_x=bt", "transpose_x=bf")),  # 4x4 @ 4x8 ok?
        ("w = slice_by_size", lambda s: s.replace("size=sw", "size=sa")),       # out of bounds
        ("cat = concat", lambda s: s.replace("(sc,zr,z)", "(sc,zt,z)")),       # mismatched
        ("cat = concat", lambda s: s.replace("interleave=bf", "interleave=bt")),
        ("sm = softmax", lambda s: s.replace("axis=ax", "axis=c2").replace("x=d", "x=rs")),
        ("zt = transpose", lambda s: s.replace("perm=pm", "perm=b0")),
        ("z = add", lambda s: s.replace("y=m", "y=rx")),                       # int32 operand
        ("y = matmul", lambda s: s.replace("transpose_x=bt", "transpose_x=ax")),  # not bool
        ("a2 = reshape", lambda s: s.replace("shape=r1", "shape=w")),          # not a const
    ]
    for fragment, fn in cases:
        lines, n = mutate(fragment, transform=fn)
        if lines == BASE:
            continue
        try:
            check("\n".join(lines), base_blobs()[0])
        except MilError as e:
            assert f"line {n}:" in str(e), (fragment, str(e))
        else:
            # transposing a square W changes values, not shapes: that one is legal
            assert fragment == "y = matmul" and "transpose_x=bf" in lines[n - 1]


def test_syntax_and_structure_errors():
    lines, n = mutate("z = add", transform=lambda s: s.rstrip(";"))
    assert f"line {n}:" in rejected(lines)
    lines, n = mutate("func main", new_line="    func main<ios18>(tensor<fp16, [1, 4, 1, 12]> x, "
                                             "tensor<fp16, [1, 4, 1, 12]> y) {")
    assert f"line {n}:" in rejected(lines, must_say="exactly one input")
    lines, n = mutate("func main", new_line="    func main<ios18>(tensor<fp16, [4, 12]> x) {")
    assert f"line {n}:" in rejected(lines, must_say="rank")
    lines, n = mutate("program(1.3)", new_line="program(1.4)")
    assert f"line {n}:" in rejected(lines)
    with pytest.raises(MilError):
        check("\n".join(BASE[:-2]), base_blobs()[0])        # no return, no closing brace
    with pytest.raises(MilError):
        check("\n".join(BASE + ["junk"]), base_blobs()[0])
    short = "\n".join(BASE).replace("val=tensor<int32, [4]>([0,0,0,0])",
                                    "val=tensor<int32, [4]>([0,0,0])")
    parse(short)                                            # well-formed, but ...
    with pytest.raises(MilError, match=f"line {line_of(BASE, 'b0 = const')}:"):
        check(short, base_blobs()[0])                       # ... 3 values for [4]


def test_rejections_in_generated_programs():
    """The same strictness holds on real kernels (line numbers in long programs)."""
    cfg = ModelConfig(dim=64, hidden_dim=96, n_layers=1, n_heads=4, vocab_size=32, seq_len=32)
    prog = mil.gen_sdpaFwd(cfg)
    lines = prog.text.split("\n")
    n = line_of(lines, "= softmax(")
    bad = list(lines)
    bad[n - 1] = bad[n - 1].replace("[1,4,32,32]>", "[1,4,32,31]>")
    with pytest.raises(MilError, match=f"line {n}:"):
        check("\n".join(bad), prog.blobs)
    blobs = dict(prog.blobs)
    del blobs["@model_path/weights/rope_cos.bin"]
    with pytest.raises(MilError, match=f"line {line_of(lines, 'rope_cos.bin')}:"):
        check(prog.text, blobs)


# ------------------------------------------------------------------------------------------
# full-size programs, shape-only
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["stories110m", "qwen3-0.6b"])
def test_full_size_programs_type_check(name):
    cfg = ModelConfig.preset("stories110m") if name == "stories110m" else QWEN3_06B
    t0 = time.perf_counter()
    for kernel in KERNEL_NAMES:
        prog = mil.generate(kernel, cfg)
        out = check(prog)
        assert out.shape == output_shape(kernel, cfg), kernel
        assert Interpreter(prog).input_type.shape == input_shape(kernel, cfg), kernel
    # shape-only checking never touches activation-sized data
    assert time.perf_counter() - t0 < 30


def test_full_size_layouts():
    cfg = QWEN3_06B
    assert input_shape("sdpaFwd", cfg) == (1, 1024, 1, 256 + 2048 + 2 * 1024 + 32)
    assert output_shape("sdpaFwd", cfg) == (1, 2 * 2048 + 2 * 1024 + 2048 + 1024, 1, 256)
    assert input_shape("sdpaBwd2", cfg) == (1, 2 * 16 * 256 + 2 * 2048, 1, 256)
    cfg = ModelConfig.preset("stories110m")
    assert input_shape("sdpaFwd", cfg) == (1, 768, 1, 256 + 3 * 768)
    assert input_shape("ffnFused", cfg) == (1, 768, 1, 2 * 256 + 3 * 2048)
