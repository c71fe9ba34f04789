"""The benchmarks run and print their figures (quick mode; no timing is asserted)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    # the scripts import this checkout's anecy, built in place
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_step_benchmark_quick(tmp_path):
    out = run("bench/bench_step.py", "--quick", "--compact", "--json", str(tmp_path / "b.json"),
              "--trace", str(tmp_path / "t.json"))
    for text in ("sgemm peak", "median ms/step", "GFLOP/s", "% of peak", "peak RSS",
                 "anecy / PyTorch ms/step", "anecy breakdown", "(Python)",
                 "with vocab compaction", "recording the timeline", "median ratio"):
        assert text in out, text
    figures = json.loads((tmp_path / "b.json").read_text())["trace"]
    assert figures["median_ratio"] > 0 and figures["ms_on"] > 0 and figures["ms_off"] > 0
    events = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    # the recorded microsteps only: the quick run times 3 (after 1 of warm-up)
    assert len([e for e in events if e.get("name") == "forward"]) == 4
    lines = {line.split()[0]: line.split() for line in out.splitlines()
             if line.strip().endswith("GiB")}
    for side in ("anecy", "pytorch"):
        ms, gflops = float(lines[side][1]), float(lines[side][2])
        assert ms > 0 and gflops > 0
        assert lines[side][-1] == "GiB" and float(lines[side][-2]) > 0


def test_fp16_benchmark_quick():
    out = run("bench/bench_fp16.py", "--n", "100000", "--repeat", "3")
    assert "GB/s" in out and "numpy" in out


def test_ane_host_benchmark_quick(tmp_path):
    out = run("bench/bench_ane_host.py", "--quick", "--trace", str(tmp_path / "ane.json"))
    assert "no-op" in out and "fp16 pass-through on" in out and "io floor" in out
    assert "io by kernel" in out and "sdpaBwd2" in out
    rows = {}
    for line in out.splitlines():
        parts = line.rsplit(None, 1)
        if len(parts) == 2:
            try:
                rows[parts[0].strip()] = float(parts[1])
            except ValueError:
                pass
    for row in ("io", "dispatch", "cpu work", "dW wait", "total", "cpu backend fwd+bwd",
                "null ane / cpu", "weight staging/update", "io / io floor"):
        assert row in rows, row
        assert rows[row] >= 0
    assert rows["io"] > 0 and rows["total"] > 0 and rows["cpu backend fwd+bwd"] > 0
    # a timeline of a null-device microstep and its update
    assert "timeline of a microstep and its update" in out
    assert rows["dW jobs"] > 0 and rows["waiting for dW"] >= 0
    events = json.loads((tmp_path / "ane.json").read_text())["traceEvents"]
    names = [e["name"] for e in events if e["ph"] == "X"]
    for name in ("forward", "backward", "sdpaFwd", "pack", "execute", "unpack",
                 "copy held q, k, v", "wait for dW", "gradient norm", "AdamW", "stage weights"):
        assert name in names, name
    assert any(e["ph"] == "X" and e["tid"] == 1 and e["name"].startswith("dW ") for e in events)


def test_lora_benchmark_quick():
    out = run("bench/bench_lora.py", "--quick")
    for text in ("anecy LoRA", "anecy full", "PyTorch+PEFT LoRA", "ms/microstep", "ms/update",
                 "peak RSS GiB", "checkpoint MB", "LoRA update / anecy full"):
        assert text in out, text
    rows = {line[:22].strip(): line[22:].split() for line in out.splitlines()
            if line.startswith("  ") and line[22:].split()[:1]
            and line[22:].split()[0].replace(".", "").isdigit()}
    for side in ("anecy LoRA", "anecy full", "PyTorch+PEFT LoRA"):
        assert len(rows[side]) == 4 and all(float(v) > 0 for v in rows[side]), rows
    # the LoRA checkpoint holds adapters and moments only: far smaller than full training's
    assert float(rows["anecy LoRA"][3]) < 0.05 * float(rows["anecy full"][3])
