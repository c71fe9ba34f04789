"""Training speed and memory of anecy's cpu backend against PyTorch eager, side by side.

One process times both sides, alternating microsteps on the same token windows (full
vocabulary, AdamW after every microstep, batch 1), after warm-up; peak RSS is measured
in a fresh process per side. Also printed: this machine's sgemm peak through the BLAS
anecy uses, sustained GFLOP/s (FLOPs as anecy.config.step_flops counts them), its share
of that peak, anecy's per-component breakdown and the share of step time spent outside
timed native code (Python).

    python bench/bench_step.py                       # stories110m
    python bench/bench_step.py --preset qwen3-0.6b --steps 3
    python bench/bench_step.py --compact             # adds a vocab-compaction run (separate)
    python bench/bench_step.py --quick               # tiny config, a smoke run (CI)
    python bench/bench_step.py --trace step.json     # adds the cost of recording a timeline
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

import anecy
from anecy._ops import BLAS_NAME
from anecy._testing import py_sgemm
from anecy.config import ModelConfig, step_flops
from anecy.corpus import builtin_tokens
from anecy.data import TokenSampler
from anecy.timeline import Recording
from anecy.trainer import TrainConfig, Trainer


def sgemm_peak(n=2048, reps=5):
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    py_sgemm(False, False, a, a)  # warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        py_sgemm(False, False, a, a)
        times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def windows(cfg, n, seed=0):
    tokens = builtin_tokens()
    if cfg.vocab_size < 32000:  # tiny test vocabularies: fold the ids into range
        tokens = (tokens % cfg.vocab_size).astype(np.uint16)
    sampler = TokenSampler(tokens, cfg.seq_len, seed)
    return tokens, [sampler.next_train() for _ in range(n)]


class AnecySide:
    def __init__(self, cfg, tokens, compact):
        tc = TrainConfig(steps=10 ** 9, accum=1, warmup=0, compact_vocab=compact)
        self.trainer = Trainer(cfg, tc, tokens=tokens, log=lambda *a: None)
        self.records = []

    def step(self, x, y):
        t = self.trainer
        t0 = time.perf_counter()
        before = t.model.timings()
        loss = t.model.forward_backward(x, t.vocab.compact(y))
        t.pending = 1
        t.step_count += 1
        t_opt = time.perf_counter()
        t._update()
        end = time.perf_counter()
        after = t.model.timings()
        rec = {k: after[k] - before[k] for k in after}
        rec["optimizer"] = (end - t_opt) * 1e3
        ms = (end - t0) * 1e3
        rec["python"] = ms - sum(rec.values())
        self.records.append(rec)
        return loss, ms


class TorchSide:
    def __init__(self, cfg):
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
        self.torch = torch
        torch.set_num_threads(os.cpu_count())
        common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim,
                      intermediate_size=cfg.hidden_dim, num_hidden_layers=cfg.n_layers,
                      num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
                      head_dim=cfg.head_dim, max_position_embeddings=cfg.seq_len,
                      rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                      tie_word_embeddings=cfg.tie_embeddings)
        self.model = (Qwen3ForCausalLM(Qwen3Config(**common)) if cfg.qk_norm
                      else LlamaForCausalLM(LlamaConfig(**common))).float().train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=3e-4, betas=(0.9, 0.95),
                                     weight_decay=0.1)

    def step(self, x, y):
        torch = self.torch
        t0 = time.perf_counter()
        logits = self.model(torch.from_numpy(x[None].astype(np.int64))).logits[0]
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y.astype(np.int64)))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=False)
        return loss.item(), (time.perf_counter() - t0) * 1e3


def own_peak_rss_bytes():
    """This process's peak RSS. Linux keeps ru_maxrss across exec (a child would report its
    parent's peak), so read the address space's own high-water mark there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_rss_gb(side, preset, steps, compact):
    """Peak RSS of a fresh process running `steps` microsteps of one side."""
    code = ("import sys; sys.argv=['x']; "
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import bench_step as b; "
            f"b.rss_child({side!r}, {preset!r}, {steps}, {compact}); "
            "print(b.own_peak_rss_bytes())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()[-1]
    return int(out) / 2 ** 30


def rss_child(side, preset, steps, compact):
    cfg = config_for(preset)
    tokens, wins = windows(cfg, steps)
    runner = AnecySide(cfg, tokens, compact) if side == "anecy" else TorchSide(cfg)
    for x, y in wins:
        runner.step(x, y)


def run_side_child(side, preset, steps, warmup):
    """Time one side in a fresh process: (ms per timed step, breakdowns, peak RSS GiB)."""
    code = ("import sys, json; sys.argv=['x']; "
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import bench_step as b; "
            f"print(json.dumps(b.side_child({side!r}, {preset!r}, {steps}, {warmup})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()[-1]
    return json.loads(out)


def side_child(side, preset, steps, warmup):
    cfg = config_for(preset)
    tokens, wins = windows(cfg, warmup + steps)
    runner = AnecySide(cfg, tokens, False) if side == "anecy" else TorchSide(cfg)
    times = [runner.step(x, y)[1] for x, y in wins][warmup:]
    records = runner.records[warmup:] if side == "anecy" else []
    return {"times": times, "records": records, "rss_gb": own_peak_rss_bytes() / 2 ** 30}


def trace_overhead(cfg, tokens, wins, warmup, path):
    """Recording's cost: one anecy side runs each window twice, once recording its
    timeline and once not (in alternating order), after warm-up. Returns the medians (ms)
    with and without recording and the median of the pairs' ratios; writes the trace of
    the recorded microsteps to path."""
    side = AnecySide(cfg, tokens, compact=False)
    rec = Recording(side.trainer.model, microsteps=len(wins))
    on, off = [], []
    for i, (x, y) in enumerate(wins):
        pair = {}
        for traced in ((True, False) if i % 2 else (False, True)):
            if traced:
                rec.start()
            pair[traced] = side.step(x, y)[1]
            rec.stop()
        if i >= warmup:
            on.append(pair[True])
            off.append(pair[False])
    rec.write(path)
    return (statistics.median(on), statistics.median(off),
            statistics.median(a / b for a, b in zip(on, off)))


def fits_together(cfg):
    """Whether both sides' training state (weights, grads, two moments each) fits in half
    of this machine's memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return True
    return 2 * 16 * cfg.n_params < total / 2


def config_for(preset):
    if preset == "quick":
        return ModelConfig(dim=64, hidden_dim=176, n_layers=2, n_heads=4, vocab_size=512,
                           seq_len=64)
    return ModelConfig.preset(preset)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="stories110m")
    ap.add_argument("--steps", type=int, default=8, help="timed microsteps per side")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--compact", action="store_true",
                    help="also time anecy with vocab compaction (reported separately)")
    ap.add_argument("--quick", action="store_true", help="tiny config, 3 steps: a smoke run")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-RSS processes")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--trace", metavar="PATH",
                    help="also time anecy recording its timeline against not (each window "
                         "run both ways, alternating) and write the recorded microsteps' "
                         "Chrome trace to PATH")
    args = ap.parse_args()
    preset = "quick" if args.quick else args.preset
    if args.quick:
        args.steps, args.warmup = 3, 1
    cfg = config_for(preset)

    print(f"anecy {anecy.__version__}, BLAS: {BLAS_NAME}, {os.cpu_count()} cores; model "
          f"{preset}: {cfg.n_params / 1e6:.1f}M params, seq {cfg.seq_len}, batch 1, AdamW "
          "every microstep")
    n = 512 if args.quick else 2048
    peak = sgemm_peak(n)
    print(f"sgemm peak ({n}^3 through anecy's sgemm): {peak:.1f} GFLOP/s")

    rss = {}
    if fits_together(cfg):
        tokens, wins = windows(cfg, args.warmup + args.steps)
        ours, theirs = AnecySide(cfg, tokens, compact=False), TorchSide(cfg)
        times = {"anecy": [], "pytorch": []}
        for i, (x, y) in enumerate(wins):
            for name, side in (("anecy", ours), ("pytorch", theirs)):
                _, ms = side.step(x, y)
                if i >= args.warmup:
                    times[name].append(ms)
        records = ours.records[args.warmup:]
        if not args.no_rss:
            rss = {name: peak_rss_gb(name, preset, 2, False) for name in times}
    else:
        # both models' training state does not fit in memory at once: each side runs in
        # its own process, one after the other (peak RSS comes from the same processes)
        print("both sides do not fit in memory together: timing each in its own process")
        tokens = None
        runs = {name: run_side_child(name, preset, args.steps, args.warmup)
                for name in ("anecy", "pytorch")}
        times = {name: r["times"] for name, r in runs.items()}
        records = runs["anecy"]["records"]
        rss = {name: r["rss_gb"] for name, r in runs.items()}

    flops = step_flops(cfg)
    result = {"preset": preset, "sgemm_peak_gflops": peak, "flops_per_step": flops}
    print(f"\nFLOPs per microstep (full vocabulary {cfg.vocab_size}): {flops / 1e9:.1f} GFLOP")
    print(f"{'side':<10}{'median ms/step':>16}{'GFLOP/s':>10}{'% of peak':>11}{'peak RSS':>11}")
    for name in ("anecy", "pytorch"):
        ms = statistics.median(times[name])
        gf = flops / (ms * 1e6)
        result[name] = {"ms": ms, "gflops": gf, "peak_share": gf / peak, "rss_gb": rss.get(name)}
        rss_text = f"{rss[name]:.2f} GiB" if name in rss else "-"
        print(f"{name:<10}{ms:>16.1f}{gf:>10.1f}{100 * gf / peak:>10.1f}%{rss_text:>11}")
    ratio = result["anecy"]["ms"] / result["pytorch"]["ms"]
    result["ratio"] = ratio
    print(f"\nanecy / PyTorch ms/step: {ratio:.2f} ({1 / ratio:.2f}x faster)")

    recs = records
    breakdown = {k: statistics.median(r[k] for r in recs) for k in recs[0]}
    result["breakdown_ms"] = breakdown
    total = sum(breakdown.values())
    print("anecy breakdown (median ms): " + " ".join(f"{k}={v:.1f}" for k, v in breakdown.items()))
    print(f"share of the step outside timed native code (Python): "
          f"{100 * breakdown['python'] / total:.2f}%")

    if args.compact:
        if tokens is None:
            tokens, wins = windows(cfg, args.warmup + args.steps)
        comp = AnecySide(cfg, tokens, compact=True)
        ctimes = [comp.step(x, y)[1] for x, y in wins][args.warmup:]
        ms = statistics.median(ctimes)
        active = comp.trainer.vocab.n_active
        cflops = step_flops(cfg, active_vocab=active)
        result["compact"] = {"ms": ms, "active_vocab": active, "gflops": cflops / (ms * 1e6)}
        print(f"\nwith vocab compaction ({cfg.vocab_size} -> {active} tokens; not comparable "
              f"to the ratio above): {ms:.1f} ms/step, {cflops / (ms * 1e6):.1f} GFLOP/s")
    if args.trace:
        if tokens is None:
            tokens, wins = windows(cfg, args.warmup + args.steps)
        on, off, ratio = trace_overhead(cfg, tokens, wins, args.warmup, args.trace)
        result["trace"] = {"ms_on": on, "ms_off": off, "median_ratio": ratio}
        print(f"\nrecording the timeline (each window with and without, alternating; load "
              f"average {os.getloadavg()[0]:.1f}): {on:.1f} vs {off:.1f} ms/step; median ratio "
              f"of the {args.steps} pairs {ratio:.4f} ({100 * (ratio - 1):+.2f}%); trace of "
              f"those microsteps: {args.trace}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
