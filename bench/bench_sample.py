"""Decoding and prefill speed of anecy's decoder, and of llama.cpp on the same weights.

    python bench/bench_sample.py [--preset stories15m,stories110m,qwen3-0.6b] [--threads 2]
        [--prompt 64] [--tokens 64] [--repeat 5]
        [--llama-python /path/to/venv/bin/python --tokenizer tokenizer.model] [--quick]

(from the repo root with anecy installed, or with PYTHONPATH=. after an in-place build)

A model of each preset's shape gets random weights. anecy decodes it with
anecy.generate.Decoder on --threads threads. With --llama-python, the same model is written
with `anecy export`'s GGUF writer (f32, with --tokenizer's vocabulary, which llama.cpp needs
to load the file; a Qwen3 shape gets it padded to its rows) and llama.cpp evaluates it
through llama-cpp-python, in a subprocess run by that interpreter (bench/llama_cpp_rates.py),
with as many threads. llama-cpp-python is no dependency of anecy: install it into an
environment of its own, e.g. `python3 -m venv ~/llamacpp && ~/llamacpp/bin/pip install
llama-cpp-python` (it compiles llama.cpp for this CPU).

Both sides do the same work on the same ids: a --prompt-token prompt from an empty cache in
one batch (prefill tokens/s), then --tokens single-token steps after it (decode tokens/s,
each step's logits computed, no sampling). The sides alternate within each repeat, so
machine noise hits them alike; medians are printed, and their ratios.
"""
import argparse
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from anecy import Model, ModelConfig
from anecy.generate import Decoder

HERE = Path(__file__).resolve().parent


def bench_ids(vocab_size, n, seed):
    """n token ids, the same for both sides (never 0, 1 or 2: unk, BOS, EOS)."""
    return (3 + np.random.default_rng(seed).integers(0, vocab_size - 3, n)).tolist()


def anecy_times(decoder, prompt, decode):
    """(prefill seconds, [seconds of each decode step])"""
    decoder.reset()
    t0 = time.perf_counter()
    decoder.step(prompt)
    prefill_s = time.perf_counter() - t0
    decode_s = []
    for token in decode:
        t0 = time.perf_counter()
        decoder.step([token])
        decode_s.append(time.perf_counter() - t0)
    return prefill_s, decode_s


class LlamaCpp:
    """llama.cpp evaluating a GGUF file in a subprocess of another interpreter."""

    def __init__(self, python, gguf_path, threads, context):
        self.proc = subprocess.Popen(
            [python, str(HERE / "llama_cpp_rates.py"), str(gguf_path), str(threads),
             str(context)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.version = self._answer()["ready"]

    def _answer(self):
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the llama.cpp side stopped (exit status {self.proc.wait()})")
        return json.loads(line)

    def times(self, prompt, decode):
        self.proc.stdin.write(" ".join(map(str, prompt)) + ";" + " ".join(map(str, decode))
                              + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        return answer["prefill_s"], answer["decode_s"]

    def close(self):
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        self.proc.wait()


def bench_preset(preset, args, tmp):
    cfg = ModelConfig.preset(preset, seq_len=8)   # the engine's window: unused here
    context = args.prompt + args.tokens
    model = Model(cfg, seed=0)
    decoder = Decoder(model, max_len=context, threads=args.threads)
    sides = {"anecy": lambda p, d: anecy_times(decoder, p, d)}
    llama = None
    if args.llama_python:
        from anecy import gguf_export
        from anecy.tokenizer import load
        path = Path(tmp) / f"{preset}.gguf"
        gguf_export.save(model, path, load(args.tokenizer), context_length=context)
        llama = LlamaCpp(args.llama_python, path, args.threads, context)
        sides[f"llama.cpp {llama.version}"] = llama.times
    prompt = bench_ids(cfg.vocab_size, args.prompt, 0)
    decode = bench_ids(cfg.vocab_size, args.tokens, 1)
    for run in sides.values():   # warm-up: page in the weights, start the threads
        run(prompt[:8], decode[:4])
    rates = {name: {"prefill": [], "decode": []} for name in sides}
    for _ in range(args.repeat):
        for name, run in sides.items():
            prefill_s, decode_s = run(prompt, decode)
            rates[name]["prefill"].append(len(prompt) / prefill_s)
            rates[name]["decode"].append(len(decode_s) / sum(decode_s))
    if llama is not None:
        llama.close()
    print(f"{preset}: {cfg.n_params / 1e6:.1f}M params fp32, {args.threads} threads, "
          f"prompt {args.prompt} tokens, {args.tokens} decoded, {args.repeat} repeats, medians")
    medians = {name: {k: statistics.median(v) for k, v in r.items()}
               for name, r in rates.items()}
    for name, m in medians.items():
        print(f"  {name:24s} decode {m['decode']:8.1f} tokens/s   prefill "
              f"{m['prefill']:8.1f} tokens/s   (decode runs: "
              + ", ".join(f"{x:.1f}" for x in rates[name]["decode"]) + ")")
    others = [name for name in medians if name != "anecy"]
    for name in others:
        print(f"  anecy / {name}: decode "
              f"{medians['anecy']['decode'] / medians[name]['decode']:.2f}, prefill "
              f"{medians['anecy']['prefill'] / medians[name]['prefill']:.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="stories15m,stories110m,qwen3-0.6b",
                    help="comma-separated presets (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill)")
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--llama-python", metavar="PATH",
                    help="a Python interpreter with llama-cpp-python (optional)")
    ap.add_argument("--tokenizer", metavar="PATH",
                    help="a vocabulary for the GGUF file (Llama 2's tokenizer.model)")
    ap.add_argument("--quick", action="store_true", help="tiny presets, few tokens (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.prompt, args.tokens, args.repeat = "tiny,qwen3-tiny", 8, 8, 2
    if args.llama_python and not args.tokenizer:
        ap.error("--llama-python needs --tokenizer (e.g. Llama 2's tokenizer.model)")
    if min(args.threads, args.prompt, args.tokens, args.repeat) < 1:
        ap.error("--threads, --prompt, --tokens and --repeat must be positive")
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.preset.split(","):
            bench_preset(preset, args, tmp)


if __name__ == "__main__":
    main()
