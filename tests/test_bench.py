"""The benchmarks run and print their figures (quick mode; no timing is asserted)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_step_benchmark_quick(tmp_path):
    out = run("bench/bench_step.py", "--quick", "--compact", "--json", str(tmp_path / "b.json"))
    for text in ("sgemm peak", "median ms/step", "GFLOP/s", "% of peak", "peak RSS",
                 "anecy / PyTorch ms/step", "anecy breakdown", "(Python)",
                 "with vocab compaction"):
        assert text in out, text
    lines = {line.split()[0]: line.split() for line in out.splitlines()
             if line.strip().endswith("GiB")}
    for side in ("anecy", "pytorch"):
        ms, gflops = float(lines[side][1]), float(lines[side][2])
        assert ms > 0 and gflops > 0
        assert lines[side][-1] == "GiB" and float(lines[side][-2]) > 0


def test_fp16_benchmark_quick():
    out = run("bench/bench_fp16.py", "--n", "100000", "--repeat", "3")
    assert "GB/s" in out and "numpy" in out
