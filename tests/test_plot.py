"""anecy plot: curves from the metrics files the trainer writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anecy.config import ModelConfig, TrainConfig
from anecy.errors import AnecyError
from anecy.plot import plot, read_metrics, smooth
from conftest import require_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Metrics of two short real training runs (tiny model, built-in corpus)."""
    from anecy.trainer import Trainer
    d = tmp_path_factory.mktemp("runs")
    paths = []
    for name, lr in (("lr3e-3.jsonl", 3e-3), ("lr1e-3.jsonl", 1e-3)):
        tc = TrainConfig(steps=24, lr=lr, accum=2, warmup=4, eval_every=8, ckpt_path=None,
                         metrics_path=str(d / name))
        Trainer(ModelConfig.preset("tiny"), tc, log=lambda *_: None).run(progress=False)
        paths.append(d / name)
    return paths


def matplotlib_or_skip():
    return require_module("matplotlib", 'pip install "anecy[plot]"', "anecy plot")


def test_plot_draws_each_run(tmp_path, runs):
    matplotlib_or_skip()
    out = tmp_path / "plot.png"
    fig = plot(runs, out)
    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    assert matplotlib.image.imread(out).shape[:2] == (800, 1200)
    ax_loss, ax_lr, ax_tps, ax_gn = fig.axes
    recs = read_metrics(runs[0])
    lines = {ln.get_label(): ln for ln in ax_loss.get_lines()}
    assert set(lines) >= {"lr3e-3.jsonl (train)", "lr3e-3.jsonl (held-out)",
                          "lr1e-3.jsonl (train)", "lr1e-3.jsonl (held-out)"}
    train = lines["lr3e-3.jsonl (train)"]
    assert list(train.get_xdata()) == list(range(1, 25))
    assert np.allclose(train.get_ydata(), smooth([r["loss"] for r in recs], 20))
    held = lines["lr3e-3.jsonl (held-out)"]
    assert list(held.get_xdata()) == [8, 16, 24]
    assert np.allclose(held.get_ydata(), [r["val_loss"] for r in recs if r["step"] % 8 == 0])
    assert np.allclose(ax_lr.get_lines()[0].get_ydata(), [r["lr"] for r in recs])
    rate = ax_tps.get_lines()[0]
    # over the last 20 steps: tokens / seconds; tiny trains 64 tokens a step
    secs = np.array([r["ms"] / 1e3 for r in recs])
    assert np.isclose(rate.get_ydata()[-1], 64 * 20 / secs[-20:].sum(), rtol=1e-6)
    assert list(ax_gn.get_lines()[0].get_xdata()) == list(range(2, 25, 2))   # updates only
    legend = [t.get_text() for t in ax_lr.get_legend().get_texts()]
    assert legend == ["lr3e-3.jsonl", "lr1e-3.jsonl"]


def test_tokens_axis_is_log_scaled(tmp_path, runs):
    matplotlib_or_skip()
    fig = plot(runs[:1], tmp_path / "plot.svg", tokens_axis=True, window=1)
    assert (tmp_path / "plot.svg").read_text().lstrip().startswith("<?xml")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    x = ax.get_lines()[0].get_xdata()
    assert np.allclose(fig.axes[2].get_lines()[0].get_ydata(),
                       [r["tokens_per_s"] for r in read_metrics(runs[0])])
    # tiny's seq_len is 64 tokens per microstep
    assert np.allclose(x, 64 * np.arange(1, 25), rtol=1e-6)


def test_resumed_and_restarted_runs(tmp_path):
    p = tmp_path / "m.jsonl"
    rec = dict(lr=1e-3, ms=10.0, tokens_per_s=6400.0, updated=True, grad_norm=1.0)
    lines = [dict(rec, step=s, loss=5.0) for s in (1, 2, 3)]
    lines += [dict(rec, step=s, loss=4.0) for s in (3, 4)]   # appended after a restart
    p.write_text("".join(json.dumps(r) + "\n" for r in lines) + "\n")
    assert [(r["step"], r["loss"]) for r in read_metrics(p)] == [(1, 5.0), (2, 5.0), (3, 4.0),
                                                                (4, 4.0)]


def test_bad_metrics_files(tmp_path):
    with pytest.raises(AnecyError, match="no such metrics file"):
        read_metrics(tmp_path / "none.jsonl")
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "loss": 2, "lr": 1, "ms": 1, "tokens_per_s": 1}\n{oops\n')
    with pytest.raises(AnecyError, match="m.jsonl:2: not a JSON line"):
        read_metrics(p)
    p.write_text('{"step": 1}\n')
    with pytest.raises(AnecyError, match="m.jsonl:1: not a metrics record"):
        read_metrics(p)
    p.write_text("\n")
    with pytest.raises(AnecyError, match="no metrics records"):
        read_metrics(p)


def test_missing_matplotlib_names_the_extra(tmp_path, runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(AnecyError, match=r'matplotlib.*pip install "anecy\[plot\]"'):
        plot(runs, tmp_path / "p.png")


def test_plot_command(tmp_path, runs):
    matplotlib_or_skip()
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def anecy(*args):
        return subprocess.run([sys.executable, "-m", "anecy", "plot", *map(str, args)],
                              env=env, capture_output=True, text=True, timeout=300)

    r = anecy(*runs, "-o", tmp_path / "p.png", "--tokens", "--title", "two runs")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    for args, needle in (((tmp_path / "no.jsonl", "-o", tmp_path / "q.png"), "no.jsonl"),
                         ((runs[0], "-o", tmp_path / "nodir" / "q.png"), "no directory"),
                         ((runs[0], "-o", tmp_path / "q.gif"), "unknown image format")):
        r = anecy(*args)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "q.png").exists()
    r = anecy("--help")
    assert r.returncode == 0 and "--tokens" in r.stdout
