"""``anecy bench`` in its quick mode: off a Mac its ane figures come from the null device,
and the JSON, the markdown row and the printed lines say so; the JSON has its schema."""
import json

import pytest

from anecy import cli
from anecy.commands import bench
from anecy.kernel_layout import KERNEL_NAMES
from conftest import require_module


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    require_module("coremltools", 'pip install -e ".[selftest]"', "anecy bench runs the selftest")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    lines = []
    report = bench.bench(["tiny"], 1, str(out), say=lines.append)
    return out, report, lines


def _number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0


def test_the_json_has_its_schema(quick_run):
    out, report, _ = quick_run
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(report))
    assert data["schema"] == "anecy-bench-1" and data["anecy"]
    assert set(data["device"]) == {"chip", "os", "os_build"}
    assert all(isinstance(v, str) and v for v in data["device"].values())
    assert data["ane_device"] == "null" and "null device" in data["note"]
    assert data["selftest"]["status"] == "ok"
    assert data["selftest"]["result"].startswith("result: OK: all 10 kernels agree")
    assert _number(data["load_average"]) and data["steps"] == 1
    [model] = data["models"]
    assert model["preset"] == "tiny" and model["seq_len"] == 64 and model["vocab_size"] == 32000
    for backend in ("ane", "cpu"):
        m = model[backend]
        for key in ("microstep_ms", "update_ms", "tokens_per_s", "build_ms"):
            assert _number(m[key]) and m[key] > 0, (backend, key)
    assert model["cpu"]["compile_ms"] is None and _number(model["ane"]["compile_ms"])
    assert list(model["ane"]["kernel_ms"]) == list(KERNEL_NAMES)
    assert all(_number(v) for v in model["ane"]["kernel_ms"].values())
    io = model["ane"]["io_ms_by_kernel"]
    assert list(io) == list(KERNEL_NAMES)
    assert all(len(v) == 2 and all(_number(x) for x in v) for v in io.values())
    assert sum(sum(v) for v in io.values()) > 0       # the microsteps packed and unpacked
    assert data["markdown"] == [bench.markdown_row(data, model)]


def test_every_row_says_null_device(quick_run):
    _, report, lines = quick_run
    header = bench.markdown_header().splitlines()[0]
    row = report["markdown"][0]
    assert row.count("|") == header.count("|")
    assert "| null device (host only) |" in row and "| tiny |" in row
    summary = [s for s in lines if s.startswith("tiny: ane microstep")]
    assert len(summary) == 1 and summary[0].endswith("(null device)")
    assert any(s.startswith("ane: null device (no Neural Engine here") for s in lines)
    assert lines[-1] == row


def test_the_command_refuses_an_unwritable_output(tmp_path, capsys):
    rc = cli.anecy_main(["bench", "--quick", "--out", str(tmp_path / "missing" / "b.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("anecy bench: error: ")


def test_without_coremltools_the_selftest_is_skipped_not_failed(monkeypatch):
    import io

    from anecy import coreml_check
    from anecy.errors import BackendUnavailable

    def missing():
        raise BackendUnavailable("anecy selftest needs coremltools 9.0: pip install ...")
    monkeypatch.setattr(coreml_check, "load_coremltools", missing)
    status, line = bench._selftest(io.StringIO())
    assert status == "skipped" and "needs coremltools" in line
