"""A timeline of training steps, written as a Chrome trace (Perfetto, chrome://tracing).

While a Recording is on, the engine records every section its timers charge, every kernel
call with its layer, every dW job it queues, the packed backends record their packing,
program execution and unpacking, and the dW worker records each job it runs, start to
completion: into preallocated buffers, from C, without the GIL (anecy._timeline). The
trainer adds each microstep, the optimizer update, and the loss and loss scale as counters.
After the steps, ``write`` turns the buffers into Chrome's trace event JSON: one track
per thread (main, dW worker), slices nested as they ran, a flow arrow from each dW job's
submission to its run.

    with model.trace("step.json"):            # or trainer.trace(...), anecy train --trace
        model.forward_backward(x, y)

docs/tracing.md says what is in a trace and what to look for."""

import bisect
import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ._timeline import (
    ALLREDUCE,
    DW_INLINE,
    DW_SUBMIT,
    EVENTS,
    KERNEL_CALLS,
    LOSS,
    LOSS_SCALE,
    MICROSTEP,
    OPTIMIZER,
    SECTION,
    WORKER_JOB,
    Timeline,
    clock_ms,
)
from .errors import ConfigError
from .fileio import atomic_write

__all__ = ["Recording", "TraceWindow", "trace_path", "clock_ms"]

MAIN, WORKER = 0, 1                     # the tracks (Chrome's thread ids)
TRACK_NAMES = {MAIN: "main", WORKER: "dW worker"}
# events a microstep can record, per layer and beyond the layers (generous: a full buffer
# drops events and says so, it never grows while recording)
EVENTS_PER_LAYER, EVENTS_PER_MICROSTEP = 256, 256
# what Python code may record as a slice of its own (Recording.span)
SPANS = {"allreduce": ALLREDUCE}


def trace_path(path, rank=None) -> Path:
    """The file of ``rank``'s trace: ``path`` itself without a rank, else ``FILE.rankN.json``
    beside it (one file per rank of a distributed run)."""
    path = Path(path)
    if rank is None:
        return path
    return path.with_name(f"{path.stem}.rank{int(rank)}{path.suffix or '.json'}")


class Recording:
    """A Timeline attached to a Model's engine: records until ``stop()``; ``write(path)``
    saves the Chrome trace. ``microsteps`` sizes the buffers (the events of that many
    microsteps, with their updates)."""

    def __init__(self, model, microsteps: int = 16, rank=None):
        if not isinstance(microsteps, int) or microsteps < 1:
            raise ConfigError(f"a recording holds at least one microstep, got {microsteps!r}")
        self.model, self.rank = model, rank
        cfg = model.config
        self.timeline = Timeline(microsteps * (EVENTS_PER_LAYER * cfg.n_layers
                                               + EVENTS_PER_MICROSTEP))
        self.on = False

    def start(self):
        """Record from the next step on (the model's engine records into this timeline)."""
        if self.model.recording is not None and self.model.recording is not self:
            raise ConfigError("the model is already being recorded")
        self.model.engine.set_timeline(self.timeline)
        self.model.recording = self
        self.on = True
        return self

    def stop(self):
        """Stop recording (the events stay, to be written)."""
        if self.on:
            self.model.engine.set_timeline(None)
            self.model.recording = None
            self.on = False

    @contextmanager
    def span(self, name: str):
        """Record the block as a slice on the main track: ``"allreduce"`` (the gradients'
        all-reduce of a distributed run)."""
        if name not in SPANS:
            raise ConfigError(f"no span {name!r}; one of {', '.join(SPANS)}")
        t0 = clock_ms()
        try:
            yield
        finally:
            if self.on:
                self.timeline.record(SPANS[name], t0, clock_ms())

    def microstep(self, t0, t_update, t1, loss, loss_scale, updated):
        """A trainer's microstep [t0, t1] (clock_ms), its update from t_update when there was
        one, the loss at its end and the loss scale it ran at."""
        if not self.on:
            return
        tl = self.timeline
        tl.record(MICROSTEP, t0, t1)
        if updated:
            tl.record(OPTIMIZER, t_update, t1)
        tl.record(LOSS_SCALE, t0, float(loss_scale))
        tl.record(LOSS, t1, float(loss))

    @property
    def dropped(self) -> int:
        """Events that did not fit in the buffers."""
        return sum(self.timeline.dropped)

    def overlap(self) -> dict:
        """What the timeline says of the overlap, in ms over the recorded steps: the kernel
        calls, the dW jobs on the worker, how much of those ran while a kernel call ran on
        the main thread, and the main thread's waits for them."""
        from .timers import ENGINE_TIMERS
        main, worker = self.timeline.events(MAIN), self.timeline.events(WORKER)
        calls = main[(main["what"] >= KERNEL_CALLS) & (main["what"] < KERNEL_CALLS + 10)]
        jobs = worker[worker["addr"] != 0]
        waits = main[main["what"] == SECTION + ENGINE_TIMERS.index("dw_wait")]
        during = sum(float(np.clip(np.minimum(j["t1"], calls["t1"])
                                   - np.maximum(j["t0"], calls["t0"]), 0, None).sum())
                     for j in jobs)
        span = lambda e: float((e["t1"] - e["t0"]).sum())     # noqa: E731
        return {"kernel calls": span(calls), "dW jobs": span(jobs),
                "dW jobs during kernel calls": during, "waiting for dW": span(waits)}

    # -- the Chrome trace ------------------------------------------------------------------
    def chrome_trace(self) -> dict:
        """The recorded events as Chrome's trace event format (a dict, as JSON has it)."""
        main, worker = self.timeline.events(MAIN), self.timeline.events(WORKER)
        starts = [e["t0"] for e in (main, worker) if len(e)]
        origin = min(float(e.min()) for e in starts) if starts else 0.0
        pid = 0 if self.rank is None else int(self.rank)
        us = lambda ms: round((float(ms) - origin) * 1e3, 3)           # noqa: E731
        names = _GradientNames(self.model)
        out = [{"ph": "M", "name": "process_name", "pid": pid,
                "args": {"name": "anecy" if self.rank is None else f"anecy rank {pid}"}}]
        for tid, name in TRACK_NAMES.items():
            out += [{"ph": "M", "name": "thread_name", "pid": pid, "tid": tid,
                     "args": {"name": name}},
                    {"ph": "M", "name": "thread_sort_index", "pid": pid, "tid": tid,
                     "args": {"sort_index": tid}}]
        slices = []                                      # main's, for naming worker calls
        for e in main:
            what = int(e["what"])
            name, cat = EVENTS[what]
            if cat == "counter":
                out.append({"ph": "C", "name": name, "pid": pid, "tid": MAIN,
                            "ts": us(e["t0"]), "args": {name: float(e["t1"])}})
                continue
            ev = {"ph": "X", "name": name, "cat": cat, "pid": pid, "tid": MAIN,
                  "ts": us(e["t0"]), "dur": round(float(e["t1"] - e["t0"]) * 1e3, 3)}
            args = {}
            if e["layer"] >= 0:
                args["layer"] = int(e["layer"])
            if what in (DW_SUBMIT, DW_INLINE):
                tensor, layer = names(int(e["addr"]))
                ev["name"] = f"{name} {tensor}"
                args.update(tensor=tensor, **({} if layer is None else {"layer": layer}))
            if what == DW_SUBMIT:
                args["job"] = int(e["ref"])
                # the arrow to the job's run: bound to this slice (its middle lies in it)
                out.append({"ph": "s", "id": int(e["ref"]), "name": "dW job", "cat": "dw",
                            "pid": pid, "tid": MAIN,
                            "ts": us((float(e["t0"]) + float(e["t1"])) / 2)})
            if args:
                ev["args"] = args
            out.append(ev)
            slices.append((float(e["t0"]), float(e["t1"]), name, cat))
        for e in worker:
            assert e["what"] == WORKER_JOB
            ev = {"ph": "X", "cat": "dw", "pid": pid, "tid": WORKER, "ts": us(e["t0"]),
                  "dur": round(float(e["t1"] - e["t0"]) * 1e3, 3),
                  "args": {"job": int(e["ref"])}}
            if e["addr"]:
                tensor, layer = names(int(e["addr"]))
                ev["name"] = f"dW {tensor}"
                ev["args"].update(tensor=tensor, **({} if layer is None else {"layer": layer}))
                out.append({"ph": "f", "bp": "e", "id": int(e["ref"]), "name": "dW job",
                            "cat": "dw", "pid": pid, "tid": WORKER, "ts": us(e["t0"])})
            else:   # a call (half of a pass the main thread runs too): named after that pass
                name, cat = _enclosing(slices, float(e["t0"]))
                ev["name"], ev["cat"] = f"{name} (worker's part)", cat
            out.append(ev)
        meta = {"clock": "CLOCK_MONOTONIC ms, as the engine's timers (origin: first event)",
                "backend": self.model.backend, "dropped_events": self.dropped}
        return {"traceEvents": out, "displayTimeUnit": "ms", "otherData": meta}

    def write(self, path) -> Path:
        """Write the Chrome trace (atomically) to ``trace_path(path, rank)``; returns that
        path."""
        path = trace_path(path, self.rank)
        with atomic_write(path, fsync=False) as f:
            f.write(json.dumps(self.chrome_trace()).encode())
        return path


def _enclosing(slices, t):
    """(name, category) of the shortest main-track slice holding time t."""
    best = None
    for t0, t1, name, cat in slices:
        if t0 <= t <= t1 and (best is None or t1 - t0 < best[1] - best[0]):
            best = (t0, t1, name, cat)
    return (best[2], best[3]) if best else ("worker call", "other")


class _GradientNames:
    """The gradient tensor (and layer) an address lies in: a Model's gradients, its adapters'
    and its compact classifier rows."""

    def __init__(self, model):
        spans = []
        if model.grads is not None:
            base = model.grads.ctypes.data
            for name, (a, b) in model.offsets.items():
                spans.append((base + 4 * a, base + 4 * b, *_short(name)))
        if model.adapter_grads is not None:
            base = model.adapter_grads.ctypes.data
            for t in model.adapters.layout:
                spans.append((base + 4 * t.offset, base + 4 * (t.offset + t.size),
                              f"{_short(t.weight)[0]}.lora_{t.part}", t.layer))
        cls_grad = getattr(model, "_cls_grad", None)
        if model.active_ids is not None and cls_grad is not None:
            base = cls_grad.ctypes.data
            spans.append((base, base + cls_grad.nbytes, "classifier (active rows)", None))
        self.spans = sorted(spans)
        self.starts = [s[0] for s in self.spans]

    def __call__(self, addr):
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and addr < self.spans[i][1]:
            return self.spans[i][2], self.spans[i][3]
        return "?", None


def _short(name):
    """("mlp.down_proj", 3) for "model.layers.3.mlp.down_proj.weight"; the classifier's and
    embedding's tensors by what they are."""
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return ".".join(parts[3:-1]), int(parts[2])
    return {"model.embed_tokens.weight": "embed_tokens (classifier)",
            "lm_head.weight": "lm_head (classifier)"}.get(name, name), None


class TraceWindow:
    """``anecy train --trace``: record the run's microsteps first..last (counted from 1 in
    this run) and write the trace after the last of them (or when the run ends first)."""

    def __init__(self, path, first: int = 2, last: int = 4, rank=None, log=print):
        if not 1 <= first <= last:
            raise ConfigError(f"trace steps {first}-{last}: need 1 <= first <= last")
        self.path, self.first, self.last, self.rank, self.log = path, first, last, rank, log
        self.recording = None
        self.recorded = 0          # the last microstep recorded so far
        self.closed = False

    def before(self, trainer, n: int):
        """Called before the run's microstep n."""
        if n == self.first:
            self.recording = Recording(trainer.model, self.last - self.first + 1,
                                       self.rank).start()

    def after(self, trainer, n: int):
        """Called after the run's microstep n."""
        if self.recording is not None:
            self.recorded = n
        if n == self.last:
            self.close()

    def close(self):
        """Stop and write (what was recorded), once."""
        rec, self.recording = self.recording, None
        if self.closed:
            return
        self.closed = True
        if rec is None:
            self.log(f"no trace written: the run ended before microstep {self.first}")
            return
        rec.stop()
        path = rec.write(self.path)
        dropped = f" ({rec.dropped} events did not fit)" if rec.dropped else ""
        steps = f"{self.first}-{self.recorded}" if self.recorded > self.first else self.first
        self.log(f"trace of microstep{'s' if self.recorded > self.first else ''} {steps} of "
                 f"this run: {path}{dropped}")
        self.log("  " + ", ".join(f"{k} {v:.1f} ms" for k, v in rec.overlap().items()))
