"""anecy selftest (anecy/commands/selftest.py): its report here, where only milsim and
coremltools run, and its Mac paths' own code run with stand-ins: milsim executing the
programs for the private-API ANE kernel (as in tests/test_ane.py) and for Core ML's
prediction. What the stand-ins cannot show is the ANE and Core ML themselves."""

import dataclasses
import io
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from anecy import cli, mil, milsim
from anecy import coreml_check as cc
from anecy._testing import PyAneKernel
from anecy.commands import selftest
from anecy.config import ModelConfig
from anecy.errors import BackendUnavailable
from anecy.kernel_layout import KERNEL_NAMES, input_shape
from anecy.selftest_runners import with_probs_of
from conftest import require

# the library function takes any config: a small one keeps the stand-in runs quick
SMALL = ModelConfig(dim=32, hidden_dim=64, n_layers=1, n_heads=2, vocab_size=64, seq_len=32)


@pytest.fixture(scope="module")
def coremltools():
    try:
        return cc.load_coremltools()
    except BackendUnavailable:
        require(False, "the Python package 'coremltools' (what anecy selftest checks with)",
                'run `pip install -e ".[test]"`')


def _run_selftest(argv):
    """As the ``anecy`` dispatcher runs a command: its parser, then run_command."""
    parser = cli.Parser(prog="anecy selftest")
    selftest.add_arguments(parser)
    return cli.run_command(parser.prog, selftest.run, parser.parse_args(argv))


@pytest.mark.usefixtures("coremltools")
def test_selftest_reports_here(capsys):
    assert isinstance(selftest.HELP, str) and "\n" not in selftest.HELP
    assert _run_selftest(["--preset", "qwen3-tiny"]) == 0
    report = capsys.readouterr().out
    lines = report.splitlines()
    assert lines[0].startswith("anecy selftest: preset qwen3-tiny (dim 64")
    assert any(s.startswith("  ane ") and "unavailable" in s and "Linux" in s for s in lines)
    assert any(s.startswith("  coreml ") and "unavailable: Core ML runs only on macOS" in s
               for s in lines)
    for kernel in KERNEL_NAMES:
        row = next(s.split() for s in lines if s.split()[:1] == [kernel])
        # kernel, ops, coremltools ok, ulp <= 2, ane n/a, coreml n/a
        assert row[2] == "ok" and float(row[3]) <= cc.VALUE_ULPS and row[4:] == ["n/a", "n/a"]
    assert lines[-1].startswith("result: OK: all 10 kernels agree on milsim, coremltools")
    assert "the ANE paths need macOS on Apple Silicon" in lines[-1]


@pytest.mark.parametrize("argv", [["--seed", "-1"], ["--seed", "x"], ["--preset", "qwen3-0.6b"]])
def test_selftest_refuses_bad_flags(argv, capsys):
    with pytest.raises(SystemExit) as info:
        _run_selftest(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("anecy selftest: error: argument")


def test_selftest_without_coremltools_is_a_one_line_user_error(monkeypatch, capsys):
    monkeypatch.setattr(cc, "_CT", None)
    for name in [m for m in sys.modules if m == "coremltools" or m.startswith("coremltools.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "coremltools", None)     # as if not installed
    assert _run_selftest([]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert len(err) == 1 and err[0].startswith("anecy selftest: error: coremltools is not "
                                               "installed"), err
    assert "pip install 'anecy[selftest]'" in err[0]


@pytest.mark.usefixtures("coremltools")
def test_selftest_fails_on_a_broken_program(monkeypatch):
    real = mil.generate

    def generate(kernel, cfg):
        prog = real(kernel, cfg)
        if kernel == "kvBwd":
            prog = dataclasses.replace(prog, text=prog.text.replace("transpose_y=",
                                                                    "transpose_b=", 1))
        return prog
    monkeypatch.setattr(mil, "generate", generate)
    out = io.StringIO()
    assert selftest.selftest(SMALL, "small", out=out) == 1
    report = out.getvalue()
    assert "kvBwd: milsim rejects it: line" in report
    assert "kvBwd: coremltools: opset:" in report and "transpose_b" in report
    assert report.splitlines()[-1].startswith("result: FAIL: 1 of 10 kernels (kvBwd)")
    qrow = next(s.split() for s in report.splitlines() if s.split()[:1] == ["qBwd"])
    assert qrow[2] == "ok"


class MilsimAne(PyAneKernel):
    """Stands in for the private-API AneKernel: runs the program with milsim on the bound
    Surfaces' memory (as tests/test_ane.py's stand-in), recording every input it was given."""
    seen: ClassVar[dict] = {}
    scale = 1.0

    def __init__(self, text, blobs, name):
        super().__init__(text, blobs, name)
        self.program = milsim.Interpreter(text, blobs)

    def evaluate(self, request):
        inp, out = request.input, request.output
        x = inp.array(np.float16, self.program.input_type.shape).copy()
        type(self).seen.setdefault(self.name, []).append(x)
        y = self.program.run(x).astype(np.float32) * np.float32(type(self).scale)
        out.array(np.float16, self.program.output_type.shape)[...] = y.astype(np.float16)


def _predict_with_milsim(cfg, calls):
    def predict(package, x):
        kernel = Path(package).stem
        assert Path(package).is_dir()
        calls.append(kernel)
        return milsim.run(mil.generate(kernel, cfg), x)
    return predict


@pytest.fixture
def stand_in_ane():
    from anecy import _packed
    _packed.clear_compiled_programs()
    cls = type("Ane", (MilsimAne,), {"seen": {}, "scale": 1.0})
    yield cls
    _packed.clear_compiled_programs()


@pytest.mark.usefixtures("coremltools")
def test_selftest_three_ways_with_stand_ins(stand_in_ane):
    """The Mac paths' own code (inputs into the AneKernels Surfaces, execute, outputs
    back; the package handed to the predictor), with milsim standing in for the ANE and
    for Core ML: everything agrees exactly, on the very input the other paths got."""
    calls = []
    out = io.StringIO()
    rc = selftest.selftest(SMALL, "small", seed=4, out=out, ane_factory=stand_in_ane,
                           predict=_predict_with_milsim(SMALL, calls))
    report = out.getvalue()
    assert rc == 0, report
    assert calls == list(KERNEL_NAMES)
    for i, kernel in enumerate(KERNEL_NAMES):
        first = stand_in_ane.seen[kernel][0]
        assert np.array_equal(first.reshape(input_shape(kernel, SMALL)),
                              cc.random_input(kernel, SMALL, 4 + i))
        row = next(s.split() for s in report.splitlines() if s.split()[:1] == [kernel])
        assert row[2] == "ok" and row[4:] == ["0", "0", "0"], row
    assert "ane~coreml" in report and "unavailable" not in report
    # sdpaBwd2 ran on the probabilities sdpaBwd1 left in their shared Surface
    assert ("chain        sdpaBwd1 -> sdpaBwd2 through their shared Surface (ane): 0 ulp of "
            "milsim's chain") in report
    x1 = cc.random_input("sdpaBwd1", SMALL, 104)
    y1 = milsim.run(mil.generate("sdpaBwd1", SMALL), x1)
    seen2 = stand_in_ane.seen["sdpaBwd2"][-1].reshape(input_shape("sdpaBwd2", SMALL))
    assert np.array_equal(seen2, with_probs_of(SMALL, cc.random_input("sdpaBwd2", SMALL, 105),
                                               y1))
    assert report.splitlines()[-1].startswith(
        "result: OK: all 10 kernels agree on milsim, coremltools, ane, coreml")


@pytest.mark.usefixtures("coremltools")
def test_selftest_reports_a_disagreeing_ane(stand_in_ane):
    stand_in_ane.scale = 1.05      # a device 5% off
    out = io.StringIO()
    rc = selftest.selftest(SMALL, "small", out=out, ane_factory=stand_in_ane,
                           predict=_predict_with_milsim(SMALL, []))
    report = out.getvalue()
    assert rc == 1
    assert "woFwd: ane differs from milsim by" in report
    assert "ane and coreml differ" in report
    assert "chain        sdpaBwd1 -> sdpaBwd2 through their shared Surface (ane): FAIL" in report
    assert "ANECY_SEPARATE_SURFACES=1 gives the two a Surface each" in report
    last = report.splitlines()[-1]
    assert last.startswith("result: FAIL: 10 of 10 kernels") and "sdpaBwd2 chain" in last


@pytest.mark.usefixtures("coremltools")
def test_selftest_reports_an_ane_that_does_not_compile(stand_in_ane):
    class Refuses(stand_in_ane):
        def __init__(self, text, blobs, name):
            raise RuntimeError(f"compiling {name} for the ANE failed: (stand-in) "
                               f"Error Code=1\nsecond line")
    out = io.StringIO()
    rc = selftest.selftest(SMALL, "small", out=out, ane_factory=Refuses,
                           predict=_predict_with_milsim(SMALL, []))
    report = out.getvalue()
    assert rc == 1
    assert ("  ane          the ane backend (private API): FAILED: compiling sdpaFwd for the "
            "ANE failed: (stand-in) Error Code=1 second line") in report
    rows = [s.split() for s in report.splitlines() if s.split()[:1] == ["woFwd"]]
    assert rows[0][4:] == ["n/a", "0"]          # coreml still ran and agreed
    assert report.splitlines()[-1].startswith("result: FAIL: the ane path did not start; "
                                              "paths run: milsim, coremltools, coreml")
