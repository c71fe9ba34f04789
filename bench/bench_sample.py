"""Decoding speed of anecy's sampler, and of llama2.c's run.c on the same file if given.

    python bench/bench_sample.py [--preset stories110m] [--tokens 128] [--repeat 5]
                                 [--run-c ./run --tokenizer tokenizer.bin] [--quick]

(from the repo root with anecy installed, or with PYTHONPATH=. after an in-place build)

A model of the preset's shape with random weights is written as a llama2.c file in a
temporary directory. Both sides generate --tokens tokens from BOS at temperature 1 and count
tokens/s from the first new token on, as run.c reports it. The sides alternate within each
repeat, so machine noise hits them alike; medians are printed, and their ratio. run.c is
llama2.c's, built by the user (e.g. `make runomp` in a llama2.c checkout; set
OMP_NUM_THREADS to the cores you give anecy's BLAS).
"""
import argparse
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from anecy import Model, ModelConfig, llama2c
from anecy.generate import Decoder, SamplingConfig, generate


def anecy_rate(model, decoder, n_tokens, seed):
    stamps = []
    for _ in generate(model, [1], n_tokens, SamplingConfig(temperature=1.0, seed=seed), (),
                      decoder):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def run_c_rate(run_c, path, tokenizer, n_tokens, seed):
    proc = subprocess.run([run_c, str(path), "-z", tokenizer, "-t", "1.0", "-n", str(n_tokens),
                           "-s", str(seed + 1)], capture_output=True, text=True, check=True)
    found = re.search(r"achieved tok/s: ([0-9.]+)", proc.stderr)
    if not found:
        raise SystemExit(f"run.c printed no rate: {proc.stderr.strip()}")
    return float(found.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="stories110m")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--run-c", metavar="PATH", help="llama2.c's compiled run (optional)")
    ap.add_argument("--tokenizer", metavar="PATH", help="tokenizer.bin for run.c")
    ap.add_argument("--quick", action="store_true", help="tiny preset, few tokens (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.tokens, args.repeat = "tiny", 16, 2
    if args.run_c and not args.tokenizer:
        ap.error("--run-c needs --tokenizer (llama2.c's tokenizer.bin)")
    context = max(args.tokens + 1, ModelConfig.preset(args.preset).seq_len)
    cfg = ModelConfig.preset(args.preset, seq_len=8)   # the engine's window: unused here
    model = Model(cfg, seed=0)
    decoder = Decoder(model, max_len=args.tokens + 1)   # one cache for every repeat
    rates = {"anecy": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.bin"
        if args.run_c:
            llama2c.save(model, path, seq_len=context)
            rates["run.c"] = []
        anecy_rate(model, decoder, min(args.tokens, 8), 0)   # warm-up
        for r in range(args.repeat):
            rates["anecy"].append(anecy_rate(model, decoder, args.tokens, r))
            if args.run_c:
                rates["run.c"].append(run_c_rate(args.run_c, path, args.tokenizer,
                                                 args.tokens, r))
    print(f"{args.preset}: {cfg.n_params / 1e6:.1f}M params, {args.tokens} tokens from BOS, "
          f"{args.repeat} repeats, medians")
    medians = {k: statistics.median(v) for k, v in rates.items()}
    for name, value in medians.items():
        print(f"  {name:6s} {value:8.1f} tokens/s   ({1e3 / value:.1f} ms/token; runs: "
              + ", ".join(f"{x:.1f}" for x in rates[name]) + ")")
    if "run.c" in medians:
        print(f"  anecy / run.c: {medians['anecy'] / medians['run.c']:.2f}")


if __name__ == "__main__":
    main()
