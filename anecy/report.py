"""What a training run tells: the record of each microstep (StepRecord, one JSON line of the
metrics file), the progress line every ten microsteps, and the Efficiency Report at the end."""

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

from .config import step_flops
from .errors import OutputError
from .timers import REPORT_ORDER


@dataclass
class StepRecord:
    """What one microstep did. `grad_norm` is set on microsteps that updated the weights."""
    step: int
    loss: float
    lr: float
    ms: float
    tokens_per_s: float
    updated: bool
    grad_norm: Optional[float] = None
    skipped: bool = False          # the update was skipped: fp16 gradients overflowed
    loss_scale: float = 1.0
    val_loss: Optional[float] = None
    timings: dict = field(default_factory=dict)   # ms of this microstep per component
    # training on examples: positions scored or giving context to a scored one, per second,
    # and as a fraction of the window
    useful_tokens_per_s: Optional[float] = None
    useful_fraction: Optional[float] = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    def scalars(self) -> dict:
        """What the trackers plot of this microstep (``--report-to``): the metrics file's
        numbers by tag, the held-out loss and grad norm only where there is one."""
        s = {"train/loss": self.loss, "train/lr": self.lr, "train/loss_scale": self.loss_scale,
             "train/tokens_per_s": self.tokens_per_s, "time_ms/step": self.ms}
        if self.grad_norm is not None:
            s["train/grad_norm"] = self.grad_norm
        if self.val_loss is not None:
            s["eval/loss"] = self.val_loss
        s.update({f"time_ms/{k}": v for k, v in self.timings.items()})
        return s


class MetricsFile:
    """The metrics file: one StepRecord per line, appended and flushed as the run goes. A
    write that fails (disk full) is kept in ``error`` for the run to stop on."""

    def __init__(self, path):
        self.path, self.error = path, None
        try:
            self.file = open(path, "a")
        except OSError as e:
            raise OutputError(f"cannot write the metrics file {path}: {e.strerror or e}") from None

    def write(self, rec: StepRecord) -> bool:
        """False once a write has failed."""
        try:
            self.file.write(rec.to_json() + "\n")
            self.file.flush()
        except OSError as e:
            self.error = e.strerror or str(e)
        return self.error is None

    def close(self):
        try:
            self.file.close()
        except OSError:
            pass

    def failure(self, step: int, saved) -> OutputError:
        return OutputError(f"cannot write the metrics file {self.path}: {self.error}; stopped "
                           f"at step {step}" + (f", checkpoint {saved}" if saved else ""))


def run_header(t) -> str:
    """The line a run starts with: the model, the backend and loss scale, the data."""
    mc = t.mc
    return (f"model: {mc.n_params / 1e6:.1f}M params, {mc.n_layers} layers, dim {mc.dim}, "
            f"seq {mc.seq_len}; backend {t.backend}{t.optimizer.scale.describe()}; "
            f"data: {t.data_name}")


def progress_line(recs) -> str:
    """The loss of the last record and the mean ms per component of all of them."""
    n = len(recs)
    avg = {k: sum(r.timings.get(k, 0.0) for r in recs) / n for k in recs[-1].timings}
    ms = sum(r.ms for r in recs) / n
    parts = " ".join(f"{k}={avg[k]:.1f}" for k in REPORT_ORDER if k in avg)
    line = f"step {recs[-1].step} loss {recs[-1].loss:.4f} | {parts} | {ms:.1f} ms/step"
    if recs[-1].useful_fraction is not None:
        useful = sum(r.useful_fraction for r in recs) / n
        per_s = sum(r.useful_tokens_per_s for r in recs) / n
        line += f" | useful {per_s:.0f} tok/s ({useful:.0%} of the window)"
    return line


def efficiency_report(t, steps_this_run: int, wall_ms: float) -> dict:
    """Log the Efficiency Report of Trainer ``t`` and return its figures."""
    mc, opt = t.mc, t.optimizer
    done = max(1, t.step_count)
    ms_per_step = t.train_ms / done
    flops = step_flops(mc, active_vocab=t.vocab.n_active)
    gflops = flops / (ms_per_step * 1e6) if ms_per_step > 0 else 0.0
    lines = ["=== Efficiency Report ===",
             f"steps:           {t.step_count} ({steps_this_run} this run, "
             f"{opt.updates} optimizer updates, {opt.scale.skipped} skipped)",
             f"wall time:       {wall_ms / 1e3:.1f} s",
             f"setup time:      {t.setup_ms:.0f} ms (data, model, backend)",
             f"train time:      {t.train_ms / 1e3:.1f} s",
             f"avg train:       {ms_per_step:.1f} ms/step",
             f"FLOPs/step:      {flops / 1e9:.2f} GFLOP (active vocab {t.vocab.n_active})",
             f"sustained:       {gflops:.1f} GFLOP/s",
             "per step:        " + " ".join(f"{k}={t.totals.get(k, 0.0) / done:.1f}"
                                            for k in REPORT_ORDER) + " ms"]
    useful = getattr(t, "useful_tokens", None)
    if useful is not None:
        window = done * mc.seq_len
        lines.append(f"useful tokens:   {useful * 1e3 / max(t.train_ms, 1e-9):.0f}/s "
                     f"({useful / window:.1%} of the window's positions: scored or context "
                     f"of a scored one)")
    for line in lines:
        t.log(line)
    if opt.scale.dynamic or opt.scale.skipped:
        t.log(f"loss scale:      dynamic, now {opt.scale.value:g} ({opt.scale.skipped} "
              f"updates skipped: fp16 gradients overflowed)")
    return {"steps": t.step_count, "updates": opt.updates, "skipped": opt.scale.skipped,
            "ms_per_step": ms_per_step, "gflops": gflops,
            "flops_per_step": flops,
            "breakdown_ms": {k: v / done for k, v in t.totals.items()},
            **({} if useful is None else
               {"useful_tokens_per_s": useful * 1e3 / max(t.train_ms, 1e-9),
                "useful_fraction": useful / (done * mc.seq_len)})}
