"""Timelines (anecy.timeline): the Chrome trace of training steps is valid trace JSON, its
slices nest on every track, its time per category is what the engine's timers and the
trainer measured for the same steps, dW jobs run on the worker while the main thread runs
kernels, the packed backends' calls hold their packing, execution and unpacking, and
recording changes no result."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anecy import backends
from anecy._packed import AneKernels, clear_compiled_programs
from anecy._testing import NullAneKernel
from anecy.config import ModelConfig, TrainConfig
from anecy.kernel_layout import KERNEL_NAMES
from anecy.lora import LoraConfig
from anecy.model import Model
from anecy.timeline import Recording, trace_path
from anecy.timers import REPORT_ORDER
from anecy.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(dim=64, hidden_dim=176, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
            seq_len=32)
# big enough that a dW sgemm lasts longer than a thread switch
WIDE = dict(dim=256, hidden_dim=704, n_layers=2, n_heads=4, vocab_size=512, seq_len=128)


def tokens_for(cfg, n=4000, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n).astype(np.uint16)


def null_ane(monkeypatch):
    """Models on the ane backend get programs that do nothing (NullAneKernel, in C)."""
    clear_compiled_programs()
    monkeypatch.setattr(backends, "available", lambda: ["cpu", "sim", "ane"])
    real = backends.make_kernels
    monkeypatch.setattr(backends, "make_kernels",
                        lambda name: AneKernels(kernel_factory=NullAneKernel) if name == "ane"
                        else real(name))


def trainer(cfg, backend, steps=6, lora=None, tmp_path=None):
    """A Trainer of cfg on random tokens, an update every microstep; with ``lora`` (a
    LoraConfig) adapters on a frozen base saved in tmp_path."""
    init_from = None
    if lora is not None:
        from anecy.hf import save_pretrained
        init_from = str(tmp_path / "base")
        save_pretrained(Model(cfg, "cpu", seed=1), init_from)
    tc = TrainConfig(steps=steps, accum=1, warmup=0, backend=backend, compact_vocab=False,
                     init_from=init_from)
    return Trainer(cfg, tc, tokens=tokens_for(cfg), log=lambda *a: None, lora=lora)


def load(path):
    with open(path) as f:
        trace = json.load(f)
    assert set(trace) >= {"traceEvents", "displayTimeUnit"}
    return trace["traceEvents"]


def slices(events, tid=None):
    return [e for e in events if e["ph"] == "X" and (tid is None or e["tid"] == tid)]


def check_valid(events):
    """Every event is a Chrome trace event; the two tracks are named; per track, any two
    slices are disjoint or one holds the other (to the microsecond the JSON rounds to)."""
    assert events
    names = {e["tid"]: e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    assert names == {0: "main", 1: "dW worker"}
    for e in events:
        assert e["ph"] in ("X", "M", "C", "s", "f")
        assert isinstance(e["pid"], int) and isinstance(e["name"], str)
        if e["ph"] != "M":
            assert e["ts"] >= 0 and e["tid"] in (0, 1)
        if e["ph"] == "X":
            assert e["dur"] >= 0 and isinstance(e["cat"], str)
        if e["ph"] == "C":
            assert len(e["args"]) == 1 and np.isfinite(list(e["args"].values())[0])
    eps = 1e-3     # us: the JSON's rounding
    for tid in (0, 1):
        open_ends = []             # the ends of the slices holding the current one
        for s in sorted(slices(events, tid), key=lambda s: (s["ts"], -s["dur"])):
            start, end = s["ts"], s["ts"] + s["dur"]
            while open_ends and open_ends[-1] <= start + eps:
                open_ends.pop()
            assert not open_ends or end <= open_ends[-1] + eps, \
                f"{s['name']} at {start} overlaps a slice partly (track {tid})"
            open_ends.append(end)
    # every submitted dW job's arrow ends at its run on the worker
    starts = {e["id"] for e in events if e["ph"] == "s"}
    ends = {e["id"] for e in events if e["ph"] == "f"}
    assert starts == ends


def category_ms(events):
    """ms per category of the main track, as the timers count it: slices not inside a slice
    of their own category; "kernels" net of the packing and unpacking ("io") inside them."""
    out = {}
    main = sorted(slices(events, 0), key=lambda s: (s["ts"], -s["dur"]))
    open_by_cat = {}
    for s in main:
        end = open_by_cat.get(s["cat"], -1.0)
        if s["ts"] < end - 1e-3:      # inside a slice of its own category
            continue
        open_by_cat[s["cat"]] = s["ts"] + s["dur"]
        out[s["cat"]] = out.get(s["cat"], 0.0) + s["dur"] / 1e3
    out["kernels"] = out.get("kernels", 0.0) - out.get("io", 0.0)
    return out


def traced_steps(t, path, n=3):
    """n microsteps of Trainer t recorded to path; their StepRecords."""
    with t.trace(path, microsteps=n):
        recs = [t.step() for _ in range(n)]
    return recs


@pytest.mark.parametrize("backend, async_dw, lora", [
    ("cpu", False, False), ("cpu", True, False), ("cpu", True, True), ("sim", True, False),
    ("ane", True, False), ("ane", True, True)])
def test_trace_is_valid_and_its_categories_are_the_timings(tmp_path, monkeypatch, backend,
                                                           async_dw, lora):
    null_ane(monkeypatch)
    monkeypatch.setitem(backends.DEFAULT_ASYNC_DW, backend, async_dw)
    cfg = ModelConfig(**TINY)
    lora_cfg = LoraConfig(rank=4, targets=("q_proj", "v_proj", "down_proj")) if lora else None
    t = trainer(cfg, backend, lora=lora_cfg, tmp_path=tmp_path)
    assert t.model.engine.async_dw == async_dw
    t.step()                                          # warm-up, not recorded
    recs = traced_steps(t, tmp_path / "t.json")
    events = load(tmp_path / "t.json")
    check_valid(events)
    traced = category_ms(events)
    for name in REPORT_ORDER:
        expected = sum(r.timings[name] for r in recs)
        assert traced.get(name, 0.0) == pytest.approx(expected, rel=0.01, abs=2e-3), name
    # one slice per kernel call, with its layer; the microsteps and counters
    calls = [s for s in slices(events, 0) if s["name"] in KERNEL_NAMES]
    # on a frozen base the lowest layer makes no input gradient: no qBwd, kvBwd there
    assert len(calls) == 3 * (10 * cfg.n_layers - (2 if lora else 0))
    assert sorted({s["args"]["layer"] for s in calls}) == list(range(cfg.n_layers))
    assert len([s for s in slices(events, 0) if s["name"] == "microstep"]) == 3
    assert len([s for s in slices(events, 0) if s["name"] == "optimizer update"]) == 3
    losses = [e["args"]["loss"] for e in events if e["ph"] == "C" and e["name"] == "loss"]
    assert losses == [r.loss for r in recs]
    scales = [e["args"]["loss scale"] for e in events
              if e["ph"] == "C" and e["name"] == "loss scale"]
    assert scales == [r.loss_scale for r in recs]
    names = {s["name"] for s in slices(events)}
    assert {"RMSNorm", "classifier", "elementwise", "embedding", "forward", "backward",
            "gradient norm", "AdamW"} <= names
    dw = [s for s in slices(events) if s["cat"] == "dw" and "tensor" in s.get("args", {})]
    if lora and backend == "cpu":
        # the adapters' backward runs inline (rank-R loops, no dW jobs): one slice per
        # adapted input and layer (q and v share one, down_proj has its own)
        inline = [s for s in slices(events, 0) if s["name"] == "LoRA backward"]
        assert not dw and inline and all(s["cat"] == "dw" for s in inline)
        assert len(inline) == 3 * 2 * cfg.n_layers
        assert {s["args"]["layer"] for s in inline} == set(range(cfg.n_layers))
        return
    assert dw and all(s["tid"] == (1 if async_dw else 0) for s in dw)
    if lora:       # the base is frozen: only the adapters' jobs
        assert all(".lora_" in s["name"] for s in dw)
        assert {s["args"]["layer"] for s in dw} == set(range(cfg.n_layers))
        assert {s["name"] for s in dw} == {f"dW {p}.lora_{ab}" for p in
                                           ("self_attn.q_proj", "self_attn.v_proj",
                                            "mlp.down_proj") for ab in "AB"}
    else:
        assert "dW mlp.down_proj" in {s["name"] for s in dw}
        assert any("classifier" in s["name"] for s in dw)
    if backend != "cpu":
        assert "stage weights" in names
        for call in calls:        # a packed call: packed, run and unpacked inside it
            inside = {s["name"] for s in slices(events, 0)
                      if call["ts"] <= s["ts"] and s["ts"] + s["dur"] <= call["ts"] + call["dur"]
                      and s is not call}
            assert {"pack", "execute", "unpack"} <= inside, call
        assert traced["io"] > 0


def test_dw_jobs_on_the_worker_overlap_kernel_calls_on_the_main_thread(tmp_path):
    cfg = ModelConfig(**WIDE)
    m = Model(cfg, "cpu", seed=0, async_dw=True)
    x = tokens_for(cfg, cfg.seq_len, seed=1).astype(np.int32)
    m.forward_backward(x, x)
    # whether the scheduler lets the worker run beside the main thread's kernels is up to the
    # machine's load: any one of a few recordings shows the overlap
    for attempt in range(5):
        path = tmp_path / f"a{attempt}.json"
        with m.trace(path, microsteps=3) as rec:
            for _ in range(3):
                m.forward_backward(x, x)
        events = load(path)
        check_valid(events)
        jobs = [s for s in slices(events, 1) if s["cat"] == "dw"]
        calls = [s for s in slices(events, 0) if s["name"] in KERNEL_NAMES]
        assert len(jobs) == 3 * (7 * cfg.n_layers + 1)   # every weight's and the classifier's
        overlapping = [(j, c) for j in jobs for c in calls
                       if j["ts"] < c["ts"] + c["dur"] and c["ts"] < j["ts"] + j["dur"]]
        summary = rec.overlap()
        during = sum(min(j["ts"] + j["dur"], c["ts"] + c["dur"]) - max(j["ts"], c["ts"])
                     for j, c in overlapping) / 1e3
        assert summary["dW jobs during kernel calls"] == pytest.approx(during, abs=1e-3)
        assert summary["dW jobs"] == pytest.approx(sum(j["dur"] for j in jobs) / 1e3,
                                                   abs=1e-3)
        if overlapping:
            break
    assert overlapping, "no dW job ran while a kernel ran, in 5 recordings"


@pytest.mark.parametrize("backend", ["cpu", "sim"])
def test_recording_changes_no_loss(tmp_path, backend):
    cfg = ModelConfig(**TINY)
    plain, traced = trainer(cfg, backend), trainer(cfg, backend)
    a = [plain.step().loss for _ in range(5)]
    with traced.trace(tmp_path / "t.json", microsteps=5):
        b = [traced.step().loss for _ in range(5)]
    assert a == b                                     # bit for bit
    assert np.array_equal(plain.model.params, traced.model.params)


def test_a_full_buffer_drops_events_and_says_so(tmp_path):
    cfg = ModelConfig(**TINY)
    m = Model(cfg, "cpu", seed=0)
    x = np.arange(cfg.seq_len, dtype=np.int32)
    rec = Recording(m, microsteps=1).start()
    for _ in range(30):        # sized for one: most of these do not fit
        m.forward_backward(x, x)
    rec.stop()
    assert rec.dropped > 0
    rec.write(tmp_path / "full.json")
    with open(tmp_path / "full.json") as f:
        trace = json.load(f)
    assert trace["otherData"]["dropped_events"] == rec.dropped
    check_valid(trace["traceEvents"])
    # stopped: the next steps record nothing
    n = len(trace["traceEvents"])
    m.forward_backward(x, x)
    assert len(rec.chrome_trace()["traceEvents"]) == n


def test_one_file_per_rank_and_a_span_for_the_allreduce(tmp_path):
    assert trace_path(tmp_path / "run.json") == tmp_path / "run.json"
    assert trace_path(tmp_path / "run.json", 1) == tmp_path / "run.rank1.json"
    cfg = ModelConfig(**TINY)
    m = Model(cfg, "cpu", seed=0)
    x = np.arange(cfg.seq_len, dtype=np.int32)
    with m.trace(tmp_path / "run.json", rank=3) as rec:
        m.forward_backward(x, x)
        with rec.span("allreduce"):
            m.grads.sum()
    events = load(tmp_path / "run.rank3.json")
    assert not (tmp_path / "run.json").exists()
    check_valid(events)
    assert {e["pid"] for e in events} == {3}
    assert [s["cat"] for s in slices(events) if s["name"] == "allreduce"] == ["allreduce"]


def run_train(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train_stories.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_train_trace_flag_records_the_chosen_microsteps(tmp_path):
    proc = run_train(["--preset", "tiny", "--steps", "5", "--accum", "1", "--no-progress",
                      "--trace", "t.json", "--trace-steps", "2-3"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "trace of microsteps 2-3" in proc.stdout
    events = load(tmp_path / "t.json")
    check_valid(events)
    assert len([s for s in slices(events, 0) if s["name"] == "microstep"]) == 2
    # default: microsteps 2-4; a run that ends first writes what it recorded
    proc = run_train(["--preset", "tiny", "--steps", "2", "--accum", "1", "--no-progress",
                      "--trace", "u.json", "--ckpt", "u.ckpt"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert len([s for s in slices(load(tmp_path / "u.json"), 0)
                if s["name"] == "microstep"]) == 1


@pytest.mark.parametrize("args, words", [
    (["--trace-steps", "2-4"], "give --trace"),
    (["--trace", "t.json", "--trace-steps", "3-2"], "1 <= A <= B"),
    (["--trace", "t.json", "--trace-steps", "x"], "1 <= A <= B"),
    (["--trace", "stories.ckpt"], "also an output"),
    (["--trace", "nowhere/t.json"], "trace file"),
])
def test_bad_trace_flags_are_one_line_and_status_2(tmp_path, args, words):
    proc = run_train(["--preset", "tiny", "--steps", "2", *args], tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr
