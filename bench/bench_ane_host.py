"""Host cost of the ane backend: everything but the Neural Engine itself.

The ane backend's real code (``anecy._packed.AneKernels``: staging plans, Surfaces, the C
evaluation path, the fp16 pass-throughs, the dW worker) runs with one thing replaced: the program
execution, by ``anecy._testing.NullAneKernel``, which returns at once without the GIL.
So a forward+backward here costs what a Mac's CPU would add around the ANE's own time.
Printed per microstep (medians over the timed steps): io (fp32 <-> fp16 staging of the
activations and outputs), dispatch (the kernel calls net of io: here, the stand-in's
call overhead), CPU work (RMSNorm, classifier, elementwise), dW wait, total, and the same
run's cpu-backend forward+backward for scale; also the weight staging after an update,
the io floor: the elements a microstep converts, at the speed this run measures for
the SIMD converters on their own (so that io can be judged on a busy machine); and io by
kernel: where io goes, packing (inputs, including the fp16 copies of held q, k, v) and
unpacking (outputs), per microstep. With --examples, the same for training on examples as
the ane backend does it (one example a window, padded after it; see docs/chat.md): windows
holding one example of a third of seq_len whose second half is scored, so the classifier
runs at those positions only; the cost per useful token is what the padding costs.

    python bench/bench_ane_host.py                          # stories110m and qwen3-0.6b
    python bench/bench_ane_host.py --preset stories110m --steps 5
    python bench/bench_ane_host.py --quick                  # tiny config, a smoke run (CI)
    python bench/bench_ane_host.py --preset stories110m --examples
    python bench/bench_ane_host.py --lora                   # also: LoRA microsteps (R 8, all
                                                            # seven targets, all layers)
    python bench/bench_ane_host.py --preset stories110m --trace step.json
                                                            # also: a timeline of a microstep
                                                            # and its update (docs/tracing.md)
"""
import argparse
import os
import statistics
import time

import numpy as np

import anecy
from anecy import backends
from anecy._ops import f16_to_f32, f32_to_f16
from anecy._packed import METHODS, AneKernels, clear_compiled_programs, kept_fp16
from anecy._testing import NullAneKernel, kernel_io
from anecy.config import ModelConfig, TrainConfig
from anecy.optimizer import Optimizer

ROWS = ("io", "dispatch", "cpu work", "dW wait", "total")


def lora_adapters(cfg):
    """R 8 adapters on all seven targets of every layer (None: full training)."""
    from anecy.lora import LoraAdapters, LoraConfig
    return LoraAdapters(cfg, LoraConfig(rank=8))


def null_ane_model(cfg, adapters=None):
    """A Model on the ane backend whose programs are NullAneKernels."""
    available, make = backends.available, backends.make_kernels
    backends.available = lambda: ["cpu", "sim", "ane"]
    backends.make_kernels = lambda name: (AneKernels(kernel_factory=NullAneKernel)
                                          if name == "ane" else make(name))
    try:
        clear_compiled_programs()
        return anecy.Model(cfg, backend="ane", seed=0, adapters=adapters)
    finally:
        backends.available, backends.make_kernels = available, make


def converted_per_microstep(model):
    """(fp32->fp16, fp16->fp32) elements the kernel calls of one microstep convert: every
    activation in and every output out, less what stays fp16 between kernels."""
    k, cfg = model.engine.kernels, model.config
    kept_in, kept_out = kept_fp16()
    n_in = n_out = 0
    for method, kernel in METHODS.items():
        ins, outs = kernel_io(k, method)
        n_in += cfg.n_layers * cfg.seq_len * sum(
            c for n, c in ins if n not in kept_in.get(kernel, ()))
        n_out += cfg.n_layers * cfg.seq_len * sum(
            c for n, c in outs if n not in kept_out.get(kernel, ()))
    return n_in, n_out


def converter_ms_per_element(n=1 << 23, reps=5):
    """This run's median speed of the SIMD converters, ms per element, out of cache."""
    a = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    h = np.empty(n, np.uint16)
    b = np.empty(n, np.float32)
    t16, t32 = [], []
    for _ in range(reps):
        t = time.perf_counter()
        f32_to_f16(a, h)
        t16.append(time.perf_counter() - t)
        t = time.perf_counter()
        f16_to_f32(h, b)
        t32.append(time.perf_counter() - t)
    return 1e3 * statistics.median(t16) / n, 1e3 * statistics.median(t32) / n


def batches(cfg, n, seed=0, examples=False):
    """n microsteps (x, y, layout): random windows, or with `examples` one example of
    seq_len/3 tokens a window (its second half scored; layout: the loss weights)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
        y = rng.integers(0, cfg.vocab_size, cfg.seq_len).astype(np.int32)
        layout = {}
        if examples:
            inputs = cfg.seq_len // 3
            weights = np.zeros(cfg.seq_len, np.float32)
            weights[inputs // 2:inputs] = 1.0 / (inputs - inputs // 2)
            x[inputs:] = 0
            layout = dict(weights=weights)
        out.append((x, y, layout))
    return out


def useful_positions(layout, seq_len):
    """Positions scored or giving context to a scored one (all, without loss weights)."""
    if "weights" not in layout:
        return seq_len
    return int(np.flatnonzero(layout["weights"])[-1]) + 1


def time_steps(model, data, warmup):
    """Per microstep: wall ms and the engine's component timings (ms); for a packed
    backend these include "io by kernel": {kernel: (packing ms, unpacking ms)}."""
    rows = []
    kernels = model.engine.kernels
    by_kernel = getattr(kernels, "io_by_kernel", None)
    for i, (x, y, layout) in enumerate(data):
        model.engine.reset_timers()
        before = kernels.io_by_kernel if by_kernel is not None else None
        t = time.perf_counter()
        model.forward_backward(x, y, 1.0, **layout)
        wall = 1e3 * (time.perf_counter() - t)
        if i >= warmup:
            timings = model.engine.timings()
            if before is not None:
                after = kernels.io_by_kernel
                timings["io by kernel"] = {k: (after[k][0] - before[k][0],
                                               after[k][1] - before[k][1]) for k in after}
            rows.append((wall, timings))
    model.zero_grad()
    return rows


def record_microstep(model, data, path):
    """A timeline of one microstep and the optimizer update after it (AdamW, restaging the
    weights), written to path as a Chrome trace."""
    opt = Optimizer(model, TrainConfig(), "ane")
    x, y, layout = data[0]
    model.zero_grad()
    with model.trace(path, microsteps=1) as rec:
        model.forward_backward(x, y, opt.scale.value, **layout)
        opt.update(1, 1)
    return rec


def bench(cfg, steps, warmup, examples=False, lora=False, trace=None):
    data = batches(cfg, steps + warmup, examples=examples)
    cpu = anecy.Model(cfg, backend="cpu", seed=0, adapters=lora_adapters(cfg) if lora else None)
    cpu_ms = statistics.median(w for w, _ in time_steps(cpu, data, warmup))
    del cpu
    ane = null_ane_model(cfg, lora_adapters(cfg) if lora else None)
    kernels = ane.engine.kernels
    runs = time_steps(ane, data, warmup)
    calls_per_step = 10 * cfg.n_layers
    stage = []
    for _ in range(max(3, warmup + 1)):
        kernels.stage_ms = 0.0
        ane.weights_changed()
        stage.append(kernels.stage_ms)
    med = lambda f: statistics.median(f(t) for _, t in runs)  # noqa: E731
    n_in, n_out = converted_per_microstep(ane)
    per16, per32 = converter_ms_per_element()
    floor = n_in * per16 + n_out * per32
    res = {
        "io": med(lambda t: t["io"]),
        "dispatch": med(lambda t: t["kernels"]),
        "cpu work": med(lambda t: t["rms"] + t["classifier"] + t["elementwise"]),
        "dW wait": med(lambda t: t["dw_wait"]),
        "total": statistics.median(w for w, _ in runs),
    }
    res["floor"] = floor
    res["by kernel"] = {k: tuple(statistics.median(t["io by kernel"][k][j] for _, t in runs)
                                 for j in (0, 1))
                        for k in runs[0][1]["io by kernel"]}
    res["converted"] = (n_in + n_out) / 1e6
    res["useful"] = useful_positions(data[0][2], cfg.seq_len)
    passed = kernels.passed_through > 0 and kernels.held_calls > 0
    if trace:
        res["overlap"] = record_microstep(ane, data, trace).overlap()
    return res, cpu_ms, statistics.median(stage), calls_per_step, passed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", action="append", help="model preset (repeatable); default: "
                    "stories110m and qwen3-0.6b")
    ap.add_argument("--steps", type=int, default=5, help="timed microsteps per preset")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny config, 3 steps (smoke test)")
    ap.add_argument("--examples", action="store_true",
                    help="also time training on examples: one example of seq_len/3 tokens a "
                         "window, its second half scored")
    ap.add_argument("--lora", action="store_true",
                    help="also time LoRA microsteps (R 8, all seven targets, all layers: "
                         "merged weights staged) beside full training's")
    ap.add_argument("--trace", metavar="PATH",
                    help="also record one microstep and its update (of the first preset, full "
                         "training) and write its timeline to PATH as a Chrome trace")
    args = ap.parse_args()
    if args.quick:
        presets, args.steps, args.warmup = ["tiny"], 3, 1
    else:
        presets = args.preset or ["stories110m", "qwen3-0.6b"]
    print("ane backend host cost: the real AneKernels, program execution replaced by a no-op")
    print(f"(medians over {args.steps} microsteps after {args.warmup} warm-up; ms; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start)")
    for name, lora in [(p, lo) for p in presets for lo in ((False, True) if args.lora
                                                            else (False,))]:
        cfg = ModelConfig.preset(name)
        trace = None if lora else args.trace
        res, cpu_ms, stage_ms, calls, passed = bench(cfg, args.steps, args.warmup, lora=lora,
                                                     trace=trace)
        if trace:
            args.trace = None        # one timeline: the first preset's, full training
        kind = "LoRA R 8, all targets (merged weights)" if lora else "full training"
        print(f"\n{name}, {kind}: {calls} kernel calls per microstep, seq_len {cfg.seq_len}, "
              f"fp16 pass-through {'on' if passed else 'OFF'}")
        print(f"  {'component':<24}{'ms/microstep':>14}")
        for row in ROWS:
            print(f"  {row:<24}{res[row]:>14.1f}")
        print(f"  {'io floor':<24}{res['floor']:>14.1f}   ({res['converted']:.1f}M elements at "
              f"this run's converter speed)")
        print(f"  {'io / io floor':<24}{res['io'] / res['floor']:>14.2f}")
        print(f"  {'io by kernel':<24}{'packing':>14}{'unpacking':>11}")
        for k, (pack, unpack) in res["by kernel"].items():
            print(f"    {k:<22}{pack:>14.1f}{unpack:>11.1f}")
        per_call = 1e3 * (res["io"] + res["dispatch"]) / calls
        print(f"  {'per kernel call':<24}{per_call:>14.1f}   us (io + dispatch)")
        print(f"  {'cpu backend fwd+bwd':<24}{cpu_ms:>14.1f}")
        print(f"  {'null ane / cpu':<24}{res['total'] / cpu_ms:>14.2f}")
        print(f"  {'weight staging/update':<24}{stage_ms:>14.1f}")
        if trace:
            print(f"  timeline of a microstep and its update: {trace}")
            for k, v in res["overlap"].items():
                print(f"    {k:<28}{v:>10.1f}")
        if args.examples and not lora:
            ex, ex_cpu_ms, _, _, _ = bench(cfg, args.steps, args.warmup, examples=True)
            print(f"  one example a window ({ex['useful']} of {cfg.seq_len} positions useful):")
            for row in ("cpu work", "total"):
                print(f"    {row:<22}{ex[row]:>14.1f}")
            print(f"    {'host us/useful token':<22}{1e3 * ex['total'] / ex['useful']:>14.1f}"
                  f"   (full windows: {1e3 * res['total'] / cfg.seq_len:.1f})")
            print(f"    {'cpu backend fwd+bwd':<22}{ex_cpu_ms:>14.1f}")


if __name__ == "__main__":
    main()
