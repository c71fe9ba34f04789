"""anecy prepare's throughput: one worker process against one per core, side by side, and
SentencePiece's .model against anecy's own reader of llama2.c's tokenizer.bin.

The text is built-in-corpus stories (TinyStories-like), written once; each configuration
runs ``--repeat`` times, alternating, and the median is printed with the ratios, and with
the CPU time used per second of wall time (about the number of cores the run obtained: on
a machine busy with other work, more workers cannot go faster than the cores they get).

    python bench/bench_prepare.py --tokenizer path/to/llama2-tokenizer --mb 8
"""
import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from anecy.corpus import builtin_stories
from anecy.prepare import prepare


def _cpu_seconds():
    """CPU time of this process and its finished children (the worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(
        resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", required=True,
                   help="a directory holding Llama 2's tokenizer.model and tokenizer.bin")
    p.add_argument("--mb", type=float, default=8.0, help="megabytes of text (default 8)")
    p.add_argument("--repeat", type=int, default=3, help="runs of each configuration")
    args = p.parse_args(argv)
    tok_dir = Path(args.tokenizer)
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        text, n = [], 0
        seed = 0
        while n < args.mb * 1e6:
            for s in builtin_stories(1000, seed=seed):
                text.append(s)
                n += len(s.encode()) + 2
            seed += 1
        (d / "in.txt").write_text("\n\n".join(text))
        size = (d / "in.txt").stat().st_size
        configs = [("tokenizer.model", 1), ("tokenizer.model", cores), ("tokenizer.bin", cores)]
        times = {c: [] for c in configs}
        cores_used = {c: [] for c in configs}
        outputs = {}
        for _ in range(args.repeat):
            for name, workers in configs:
                out = d / f"{name}-{workers}.bin"
                t, cpu = time.perf_counter(), _cpu_seconds()
                prepare([d / "in.txt"], tok_dir / name, out, workers=workers, progress=False,
                        log=lambda *_: None)
                wall = time.perf_counter() - t
                times[name, workers].append(wall)
                cores_used[name, workers].append((_cpu_seconds() - cpu) / wall)
                outputs[name, workers] = out.read_bytes()
        same = len(set(outputs.values())) == 1
        print(f"{size / 1e6:.1f} MB of text, {len(text)} documents, {cores} cores; "
              f"median of {args.repeat} runs each (the same token file from all: {same})")
        med = {c: statistics.median(ts) for c, ts in times.items()}
        for (name, workers), m in med.items():
            used = statistics.median(cores_used[name, workers])
            print(f"  {name:16s} workers={workers}: {m:7.2f} s  {size / m / 1e6:6.2f} MB/s  "
                  f"CPU time / wall time {used:.2f}")
        one, many, binary = (med[c] for c in configs)
        print(f"speedup of {cores} workers over 1 (tokenizer.model): {one / many:.2f}x")
        print(f"tokenizer.bin / tokenizer.model time ({cores} workers): {binary / many:.1f}x")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
