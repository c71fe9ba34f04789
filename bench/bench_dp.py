#!/usr/bin/env python3
"""Data-parallel training over MPI on this machine, and on paper over several.

Measured, side by side, on the same windows per update: 2 ranks (``mpirun -n 2``) with one
BLAS thread each, against 1 process with two threads: ms per update, and for the ranks the
gradient all-reduce's ms and bytes per update. Then, from those figures, the expected
speed-up of 2, 4 and 8 machines like this one over 1, 10 and 40 Gbit/s links, for
Stories110M and Qwen3-0.6B, full and LoRA training.

    python bench/bench_dp.py                 # stories15m, 2 x 4 windows per update
    python bench/bench_dp.py --quick         # tiny model (CI smoke run)
    python bench/bench_dp.py --json out.json

The paper model: a machine computes its ``accum`` windows at the sustained GFLOP/s
measured here (one process, two threads), LoRA at 2/3 of full training's FLOPs (no weight
gradients of the frozen matrices); the gradients (4 bytes a trainable parameter) are summed
by a ring all-reduce, each machine sending and receiving 2 (N-1)/N of them over its link, plus
2 (N-1) latency steps of LINK_LATENCY_MS per bucket; nothing overlaps."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LINK_LATENCY_MS = 0.05          # one message step on a switched Ethernet link
MACHINES = (2, 4, 8)
LINKS_GBIT = (1, 10, 40)
TARGETS = (("Stories110M", "stories110m"), ("Qwen3-0.6B", "qwen3-0.6b"))


def worker(args):
    """One side of the measurement (under mpirun or alone): train `updates` updates of
    `accum` windows a rank, print one JSON line (rank 0) with the per-update figures."""
    from anecy import ModelConfig, TrainConfig, Trainer
    from anecy.config import step_flops
    mc = ModelConfig.preset(args.preset)
    mc.seq_len = args.seq_len
    steps_per_update = args.accum * args.ranks
    tc = TrainConfig(steps=steps_per_update * (args.updates + 1), accum=args.accum,
                     warmup=1, ckpt_every=0, eval_every=0, sample_every=0, seed=1)
    t = Trainer(mc, tc, log=lambda *_: None)
    times, first = [], True
    t0 = time.perf_counter()
    while t.step_count < tc.steps:
        rec = t.step()
        if rec.updated:
            now = time.perf_counter()
            if not first:                  # the first update warms the caches up
                times.append((now - t0) * 1e3)
            first, t0 = False, now
    out = {"ms_per_update": statistics.median(times), "windows_per_update": steps_per_update,
           "gflop_per_window": step_flops(mc, active_vocab=t.vocab.n_active) / 1e9}
    if t.dp is not None:
        out["allreduce_ms"] = t.dp.reduce_ms / t.dp.reduces
        out["allreduce_bytes"] = t.dp.reduce_bytes // t.dp.reduces
    if t.writes:
        print(json.dumps(out), flush=True)


def measure(args, ranks, threads):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH"))
                                          if p))
    env.pop("ANECY_DATA", None)
    env.update(OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", "--preset", args.preset, "--seq-len",
           str(args.seq_len), "--updates", str(args.updates), "--ranks", str(ranks),
           "--accum", str(args.accum * (2 // ranks))]
    if ranks > 1:
        cmd = ["mpirun", "-n", str(ranks), "--oversubscribe", "-x", "OMP_NUM_THREADS",
               "-x", "OPENBLAS_NUM_THREADS", *cmd]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        sys.exit(f"bench_dp: the {ranks}-rank run failed:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def paper(gflops, accum):
    """Expected ms per update and speed-up over one machine, per model, mode, N, link."""
    import numpy as np

    from anecy import ModelConfig
    from anecy.config import step_flops
    from anecy.distributed import BUCKET_BYTES
    from anecy.lora import LoraAdapters, LoraConfig
    rows = []
    for name, preset in TARGETS:
        mc = ModelConfig.preset(preset)
        full_flops = step_flops(mc)
        lora_params = LoraAdapters(mc, LoraConfig(), seed=0).params.size
        for mode, flops, params in (("full", full_flops, mc.n_params),
                                    ("LoRA", full_flops * 2 / 3, lora_params)):
            window_ms = flops / (gflops * 1e9) * 1e3
            grad_bytes = 4 * params
            buckets = int(np.ceil(grad_bytes / BUCKET_BYTES))
            for n in MACHINES:
                for gbit in LINKS_GBIT:
                    ring_ms = (2 * (n - 1) / n * grad_bytes * 8 / (gbit * 1e9) * 1e3
                               + 2 * (n - 1) * buckets * LINK_LATENCY_MS)
                    update_ms = accum * window_ms + ring_ms
                    speedup = n * accum * window_ms / update_ms
                    rows.append(dict(model=name, mode=mode, machines=n, gbit=gbit,
                                     grad_mb=grad_bytes / 1e6, window_s=window_ms / 1e3,
                                     allreduce_s=ring_ms / 1e3, speedup=speedup,
                                     efficiency=speedup / n))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, 3 updates (smoke run)")
    ap.add_argument("--preset", default="stories15m")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--accum", type=int, default=4, help="windows per rank per update")
    ap.add_argument("--updates", type=int, default=4, help="updates timed per run")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each side, alternated")
    ap.add_argument("--gflops", type=float, metavar="X",
                    help="also compute the paper table for machines sustaining X GFLOP/s")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ranks", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.preset, args.seq_len, args.accum, args.updates, args.rounds = "tiny", 32, 2, 3, 1
    load = os.getloadavg()[0]
    print(f"bench_dp: {args.preset}, seq {args.seq_len}, {2 * args.accum} windows per update; "
          f"load {load:.2f} on {os.cpu_count()} cores")
    # the sides alternate, so that a change of load hits each; medians over the rounds.
    # (ranks, BLAS threads a rank): the comparison asked for, and one process on one thread
    # for scale
    sides = ((1, 2), (2, 1), (1, 1))
    runs = {side: [] for side in sides}
    for _ in range(args.rounds):
        for side in sides:
            runs[side].append(measure(args, *side))
    one, two, single = ({k: statistics.median(r[k] for r in runs[side]) for k in runs[side][0]}
                        for side in sides)
    flop = one["gflop_per_window"] * one["windows_per_update"]
    # the machine's sustained rate: the fastest side's, the all-reduce left out
    gflops = max(flop / (one["ms_per_update"] / 1e3), flop / (single["ms_per_update"] / 1e3),
                 flop / ((two["ms_per_update"] - two["allreduce_ms"]) / 1e3))
    print(f"\nmedians of {args.updates} updates x {args.rounds} runs a side, alternated")
    print("\n| run | ms per update | all-reduce ms per update (with the wait for the slower "
          "rank) | all-reduce MB per update |")
    print("|---|---:|---:|---:|")
    print(f"| 1 process x 2 threads | {one['ms_per_update']:.1f} | - | - |")
    print(f"| 2 ranks x 1 thread | {two['ms_per_update']:.1f} | {two['allreduce_ms']:.1f} | "
          f"{two['allreduce_bytes'] / 1e6:.2f} |")
    print(f"| 1 process x 1 thread | {single['ms_per_update']:.1f} | - | - |")
    print(f"\n2 ranks / 1 process ms per update: "
          f"{two['ms_per_update'] / one['ms_per_update']:.2f}; this machine sustains "
          f"{gflops:.1f} GFLOP/s (the faster side, all-reduce left out)")
    tables = {"this machine": paper_table(gflops, "machines like this one")}
    if args.gflops:
        tables["given"] = paper_table(args.gflops, "machines given by --gflops")
    if args.json:
        Path(args.json).write_text(json.dumps({"load": load, "one_process": one,
                                               "two_ranks": two, "one_thread": single,
                                               "gflops": gflops,
                                               "paper": tables}, indent=1))


def paper_table(gflops, what, accum=10):
    rows = paper(gflops, accum)
    print(f"\nOn paper: {what} ({gflops:.1f} GFLOP/s), {accum} windows per machine per "
          "update (full-length windows), ring all-reduce: speed-up over one machine")
    print("\n| model | training | gradients MB | s per window | " +
          " | ".join(f"{n} x {g} Gbit/s" for n in MACHINES for g in LINKS_GBIT) + " |")
    print("|---|---|---:|---:|" + "---:|" * (len(MACHINES) * len(LINKS_GBIT)))
    for i in range(0, len(rows), len(MACHINES) * len(LINKS_GBIT)):
        group = rows[i:i + len(MACHINES) * len(LINKS_GBIT)]
        r0 = group[0]
        print(f"| {r0['model']} | {r0['mode']} | {r0['grad_mb']:.0f} | {r0['window_s']:.2f} | "
              + " | ".join(f"{r['speedup']:.2f}" for r in group) + " |")
    return rows


if __name__ == "__main__":
    main()
