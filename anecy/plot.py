"""``anecy plot``: training curves from the metrics files ``anecy train --metrics`` writes.

A metrics file has one JSON object per microstep (``anecy.report.StepRecord``): step,
loss, lr, ms, tokens_per_s, updated, grad_norm (on steps that updated the weights),
val_loss (on steps that evaluated) and timings. A resumed run appends to the same file;
when steps repeat (a run started again into the same file), the later records win.
"""

import io
import math
from numbers import Real
from pathlib import Path

from . import jsonio
from .errors import AnecyError, cannot_read
from .fileio import atomic_write, check_writable, missing

PLOT_EXTRA = 'pip install "anecy[plot]"'
_REQUIRED = ("step", "loss", "lr", "ms", "tokens_per_s")
_OPTIONAL = ("val_loss", "grad_norm")   # numbers, or null on steps without them


def _field_error(rec) -> "str | None":
    """What is wrong with the types of a metrics record's fields, or None."""
    def number(v):
        return isinstance(v, Real) and not isinstance(v, bool)

    def kind(v):
        return {type(None): "null", bool: "true/false", str: "a string", list: "a list",
                dict: "an object", float: "a fraction"}.get(type(v), type(v).__name__)

    if not (isinstance(rec["step"], int) and not isinstance(rec["step"], bool)):
        return f'"step" is {kind(rec["step"])}, not an integer'
    for key in _REQUIRED[1:]:
        if not number(rec[key]):
            return f'"{key}" is {kind(rec[key])}, not a number'
    for key in _OPTIONAL:
        if rec.get(key) is not None and not number(rec[key]):
            return f'"{key}" is {kind(rec[key])}, not a number or null'
    return None


def read_metrics(path) -> list:
    """The records of a metrics file, by step (the last record of each step)."""
    path = Path(path)
    by_step = {}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = jsonio.loads(line)
                except ValueError as e:
                    raise AnecyError(f"{path}:{lineno}: not a JSON line ({e})") from None
                if not isinstance(rec, dict) or any(k not in rec for k in _REQUIRED):
                    raise AnecyError(f"{path}:{lineno}: not a metrics record (needs "
                                     f"{', '.join(_REQUIRED)}; written by anecy train "
                                     "--metrics)")
                wrong = _field_error(rec)
                if wrong:
                    raise AnecyError(f"{path}:{lineno}: {wrong}")
                by_step[rec["step"]] = rec
    except FileNotFoundError:
        why = missing(path)
        raise AnecyError(f"{path}: " + ("no such metrics file" if why == "no such file"
                                        else why)) from None
    except IsADirectoryError:
        raise AnecyError(f"{path}: is a directory, not a metrics file") from None
    except UnicodeDecodeError:
        raise AnecyError(f"{path}: not a text file") from None
    except OSError as e:
        raise cannot_read(path, e) from None
    if not by_step:
        raise AnecyError(f"{path}: no metrics records (empty file)")
    return [by_step[s] for s in sorted(by_step)]


def smooth(values, window):
    """Running mean over the last ``window`` values (the noise of batch-1 losses)."""
    out, total, q = [], 0.0, []
    for v in values:
        q.append(v)
        total += v
        if len(q) > window:
            total -= q.pop(0)
        out.append(total / len(q))
    return out


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise AnecyError(f"plotting needs the Python package 'matplotlib': run "
                         f"`{PLOT_EXTRA}`") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _labels(paths):
    """Run names for the legend: file names, or whole paths where the names repeat."""
    names = [Path(p).name for p in paths]
    return [str(p) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def plot(paths, out, tokens_axis=False, window=20, title=None):
    """Draw loss and held-out loss, learning rate, tokens/s and gradient norm of the runs
    in ``paths`` against the step (or, with ``tokens_axis``, the tokens trained on, on a
    log scale) into the image ``out`` (its format from the extension: png, svg, pdf);
    returns the Figure."""
    out = Path(out)
    if not paths:
        raise AnecyError("no metrics files")
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf", "jpg", "jpeg"):
        raise AnecyError(f"{out}: unknown image format {out.suffix!r} (use .png, .svg or .pdf)")
    check_writable(out, what="plot", inputs=paths)
    runs = [read_metrics(p) for p in paths]
    plt = _pyplot()

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    (ax_loss, ax_lr), (ax_tps, ax_gn) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (recs, label) in enumerate(zip(runs, _labels(paths))):
        color = colors[k % len(colors)]
        if tokens_axis:
            # tokens of a step = its tokens/s x its seconds (seq_len for one sequence)
            seen, x = 0.0, []
            for r in recs:
                seen += r["tokens_per_s"] * r["ms"] / 1e3
                x.append(seen)
        else:
            x = [r["step"] for r in recs]
        loss = [r["loss"] for r in recs]
        if window > 1 and len(loss) > 1:
            ax_loss.plot(x, loss, color=color, alpha=0.25, linewidth=0.8)
            ax_loss.plot(x, smooth(loss, window), color=color, label=f"{label} (train)")
        else:
            ax_loss.plot(x, loss, color=color, label=f"{label} (train)")
        val = [(xi, r["val_loss"]) for xi, r in zip(x, recs) if r.get("val_loss") is not None]
        if val:
            ax_loss.plot(*zip(*val), color=color, linestyle="--", marker="o", markersize=4,
                         label=f"{label} (held-out)")
        ax_lr.plot(x, [r["lr"] for r in recs], color=color, label=label)
        tps = [r["tokens_per_s"] for r in recs]
        if window > 1 and len(tps) > 1:
            # the rate over the window (tokens / seconds), not a mean of per-step rates: one
            # slow step (an optimizer update, a busy machine) counts for its time; per-step
            # rates swing by 10x between steps with and without an update, so not drawn
            secs = [r["ms"] / 1e3 for r in recs]
            toks = [t * s for t, s in zip(tps, secs)]
            ax_tps.plot(x, [a / b if b > 0 else 0.0 for a, b in zip(smooth(toks, window),
                                                                       smooth(secs, window))],
                        color=color, label=label)
        else:
            ax_tps.plot(x, tps, color=color, label=label)
        gn = [(xi, r["grad_norm"]) for xi, r in zip(x, recs)
              if r.get("grad_norm") is not None and math.isfinite(r["grad_norm"])]
        if gn:
            ax_gn.plot(*zip(*gn), color=color, label=label)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss" + (f" (train: mean of {window} steps)" if window > 1 else ""))
    ax_lr.set_title("learning rate")
    ax_tps.set_title("tokens/s" + (f" (over {window} steps)" if window > 1 else ""))
    ax_gn.set_title("gradient norm (before clipping)")
    for ax in axes.flat:
        ax.grid(True, alpha=0.3)
        if tokens_axis:
            ax.set_xscale("log")
    for ax in axes[1]:
        ax.set_xlabel("tokens trained on" if tokens_axis else "step")
        ax.xaxis.set_tick_params(labelbottom=True)
    ax_loss.legend(fontsize="small")
    if len(runs) > 1:
        ax_lr.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=100)
    with atomic_write(out) as f:
        f.write(buf.getvalue())
    return fig
