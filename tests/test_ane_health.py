"""What the ane backend does before it trusts the hardware and when the hardware disagrees
(anecy.ane_health), with stand-in executors in place of the Neural Engine: the shared-surface
probe and its cache, compile, bind and evaluation failures at each stage under
``--backend auto`` (training continues on cpu) and ``--backend ane`` (exit 2, one line, no
checkpoint), and the compile budget through a whole run."""
import json
from typing import ClassVar

import numpy as np
import pytest

from anecy import Model, ModelConfig, TrainConfig, Trainer, _packed, ane_health, backends, cli
from anecy._ane_runtime import AneError
from anecy._packed import AneKernels
from anecy._testing import PyAneKernel
from anecy.milsim import Interpreter

TINY = ModelConfig.preset("tiny")


class MilsimAne(PyAneKernel):
    """Stands in for the private-API AneKernel: runs the program with milsim on the bound
    Surfaces' memory, as the ANE reads and writes the IOSurfaces. ``fail`` = (stage, kernel,
    after): compiling kernel fails (stage "compile"), binding it ("bind"), or its evaluation
    after ``after`` good ones ("evaluate"). ``corrupt_shared``: sdpaBwd2 reads the probs and
    dprobs of a Surface that sdpaBwd1 wrote as zeros (what a device that does not let one
    IOSurface be one request's output and another's input might do)."""
    fail = None
    corrupt_shared = False
    evaluations: ClassVar[dict] = {}
    outputs: ClassVar[set] = set()

    def __init__(self, text, blobs, name):
        if self.fail and self.fail[:2] == ("compile", name):
            raise AneError(f"compiling {name} for the ANE failed: (stand-in) "
                           "ANECCompile() FAILED")
        super().__init__(text, blobs, name)
        self.program = Interpreter(text, blobs)

    def bind(self, inp, out):
        if self.fail and self.fail[:2] == ("bind", self.name):
            raise AneError(f"{self.name}: could not create an ANE request: (stand-in)")
        if self.name == "sdpaBwd1":
            type(self).outputs.add(out.address)
        return super().bind(inp, out)

    def evaluate(self, request):
        n = type(self).evaluations.get(self.name, 0)
        type(self).evaluations[self.name] = n + 1
        if self.fail and self.fail[:2] == ("evaluate", self.name) and n >= self.fail[2]:
            raise AneError("(stand-in) Program Inference error status=0x1d")
        inp, out = request.input, request.output
        x = inp.array(np.float16, self.program.input_type.shape).copy()
        if self.name == "sdpaBwd2" and self.corrupt_shared and inp.address in self.outputs:
            x[:, :2 * TINY.n_heads * TINY.seq_len] = 0
        out.array(np.float16, self.program.output_type.shape)[...] = self.program.run(x)


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """A fresh MilsimAne class, the ane backend made available with it, the probe cache in
    tmp_path, and the stand-in treated as the hardware (so the probe runs on start)."""
    _packed.clear_compiled_programs()
    cls = type("Ane", (MilsimAne,), {"fail": None, "corrupt_shared": False,
                                      "evaluations": {}, "outputs": set()})

    class StandInAneKernels(AneKernels):
        def __init__(self, kernel_factory=None):
            super().__init__(kernel_factory or cls)

    real = backends.kernels_class
    monkeypatch.setattr(backends, "available", lambda: ["cpu", "sim", "ane"])
    monkeypatch.setattr(backends, "kernels_class",
                        lambda name: StandInAneKernels if name == "ane" else real(name))
    monkeypatch.setattr(ane_health, "_on_hardware", lambda kernels: True)
    monkeypatch.setattr(ane_health, "_SAID", set())
    monkeypatch.setenv(ane_health.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(_packed.SEPARATE_SURFACES_ENV, raising=False)
    yield cls
    _packed.clear_compiled_programs()


def _cache():
    return json.loads(ane_health.cache_path().read_text())


# -----------------------------------------------------------------------------------------
# the shared-surface probe
# -----------------------------------------------------------------------------------------

def test_a_faithful_device_passes_the_probe_once(stand_in, monkeypatch):
    lines = []
    assert ane_health.shared_surface_ok(stand_in, lines.append) is True
    assert lines == []
    entry = _cache()[ane_health._device_key()]["shared_surface"]
    assert entry["ok"] is True and entry["ulp"] <= entry["bound"] == 64
    assert entry["anecy"] and entry["when"]
    # cached per chip and macOS build: the second start costs no probe
    ran = stand_in.evaluations.copy()
    monkeypatch.setattr(ane_health, "probe_shared_surface",
                        lambda *a, **k: pytest.fail("probed twice"))
    assert ane_health.shared_surface_ok(stand_in, lines.append) is True
    assert stand_in.evaluations == ran
    # another build is another entry
    monkeypatch.setattr(ane_health, "_device_key", lambda: "Apple M9 | 99Z999")
    with pytest.raises(pytest.fail.Exception, match="probed twice"):
        ane_health.shared_surface_ok(stand_in, lines.append)


def test_a_device_that_corrupts_the_shared_surface_fails_the_probe(stand_in):
    stand_in.corrupt_shared = True
    lines = []
    assert ane_health.shared_surface_ok(stand_in, lines.append) is False
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith("ane: one Surface shared by sdpaBwd1 and sdpaBwd2 failed its "
                               "probe on ")
    assert "more than 64" in lines[0] and "ANECY_SEPARATE_SURFACES=1" in lines[0]
    entry = _cache()[ane_health._device_key()]["shared_surface"]
    assert entry["ok"] is False and entry["ulp"] > 64
    # said once per process, and cached: a second start says nothing and probes nothing
    assert ane_health.shared_surface_ok(stand_in, lines.append) is False
    assert len(lines) == 1


def test_training_on_a_corrupting_device_takes_the_safe_path(stand_in, capsys):
    """The probe runs when the ane backend starts; after it fails, the model's sdpaBwd1 and
    sdpaBwd2 get a Surface each, and a training step equals the sim backend's bit for bit
    (with the shared Surface, this device would have corrupted every attention gradient)."""
    stand_in.corrupt_shared = True
    ane = Model(TINY, backend="ane", seed=3)
    assert "failed its probe" in capsys.readouterr().out
    assert ane.engine.kernels.share_surfaces is False
    assert ane.engine.kernels.output_surface("sdpaBwd1") \
        is not ane.engine.kernels.input_surface("sdpaBwd2")
    sim = Model(TINY, backend="sim", seed=3)
    rng = np.random.default_rng(0)
    x = rng.integers(0, TINY.vocab_size, TINY.seq_len)
    y = rng.integers(0, TINY.vocab_size, TINY.seq_len)
    assert ane.forward_backward(x, y, 4096.0) == sim.forward_backward(x, y, 4096.0)
    assert np.array_equal(ane.grads, sim.grads)


def test_a_faithful_device_keeps_the_shared_surface(stand_in):
    m = Model(TINY, backend="ane", seed=0)
    k = m.engine.kernels
    assert k.share_surfaces is True and k.output_surface("sdpaBwd1") is k.input_surface(
        "sdpaBwd2")


def test_the_environment_switch_skips_the_probe(stand_in, monkeypatch):
    monkeypatch.setenv(_packed.SEPARATE_SURFACES_ENV, "1")
    monkeypatch.setattr(ane_health, "probe_shared_surface",
                        lambda *a, **k: pytest.fail("probed"))
    m = Model(TINY, backend="ane", seed=0)
    assert m.engine.kernels.share_surfaces is False
    assert not ane_health.cache_path().exists()


def test_an_unreadable_cache_is_probed_again_and_rewritten(stand_in):
    path = ane_health.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    assert ane_health.shared_surface_ok(stand_in, print) is True
    assert _cache()[ane_health._device_key()]["shared_surface"]["ok"] is True
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temporary left


def test_a_probe_whose_reference_cannot_run_is_not_cached(stand_in):
    stand_in.fail = ("compile", "sdpaBwd1", 0)
    lines = []
    assert ane_health.shared_surface_ok(stand_in, lines.append) is False
    assert lines == []            # the model's own compile will name the failure
    assert not ane_health.cache_path().exists()


# -----------------------------------------------------------------------------------------
# failures at each stage: auto falls back to cpu, ane stops with one line and exit 2
# -----------------------------------------------------------------------------------------

STAGES = [("compile", "ffnFused", 0, "could not compile and load ffnFused (every layer, "
           "input [1,64,1,656] -> output [1,592,1,64])"),
          ("bind", "qBwd", 0, "could not bind qBwd (layer 0, input [1,64,1,128] -> output "
           "[1,64,1,64])"),
          ("evaluate", "kvBwd", 2, "could not evaluate kvBwd (layer 1, input [1,64,1,256] -> "
           "output [1,64,1,64])")]


@pytest.mark.parametrize("stage,kernel,after,named", STAGES, ids=[s[0] for s in STAGES])
def test_auto_continues_on_cpu_after_one_line(stand_in, stage, kernel, after, named):
    stand_in.fail = (stage, kernel, after)
    lines = []
    tc = TrainConfig(steps=4, accum=2, backend="auto", ckpt_path=None)
    t = Trainer(TINY, tc, log=lines.append)
    if stage != "evaluate":
        assert t.backend == "cpu" and t.model.backend == "cpu"
    losses = [t.step().loss for _ in range(4)]
    assert all(np.isfinite(losses))
    assert t.backend == "cpu" and t.model.backend == "cpu"
    said = [s for s in lines if "could not" in s]
    assert len(said) == 1 and "\n" not in said[0]
    assert said[0].startswith(f"the ane backend {named} on ")
    assert said[0].endswith("; training continues on the cpu backend")
    assert ane_health.device()["os"] in said[0]


@pytest.mark.parametrize("stage,kernel,after,named", STAGES, ids=[s[0] for s in STAGES])
def test_backend_ane_stops_with_exit_2_and_no_checkpoint(stand_in, tmp_path, capsys, stage,
                                                         kernel, after, named):
    stand_in.fail = (stage, kernel, after)
    ckpt = tmp_path / "run.ckpt"
    rc = cli.anecy_main(["train", "--preset", "tiny", "--steps", "6", "--accum", "2",
                         "--backend", "ane", "--ckpt", str(ckpt), "--ckpt-every", "2",
                         "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith(f"anecy train: error: the ane backend {named}")
    assert "Traceback" not in err[0]
    assert not ckpt.exists()
    assert [p.name for p in tmp_path.iterdir()] in ([], ["cache"])    # the probe's cache


def test_a_resumed_run_that_fails_on_the_ane_leaves_its_checkpoint(stand_in, tmp_path, capsys):
    ckpt = tmp_path / "run.ckpt"
    args = ["train", "--preset", "tiny", "--accum", "2", "--ckpt", str(ckpt), "--no-progress"]
    assert cli.anecy_main(args + ["--steps", "2", "--backend", "cpu"]) == 0
    saved = ckpt.read_bytes()
    stand_in.fail = ("evaluate", "woFwd", 3)
    capsys.readouterr()
    rc = cli.anecy_main(args + ["--steps", "8", "--backend", "ane", "--resume",
                                "--ckpt-every", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "could not evaluate woFwd (layer 1" in err[0]
    assert ckpt.read_bytes() == saved


def test_an_evaluation_failure_under_auto_keeps_the_update_exact(stand_in):
    """The microstep that failed is redone on cpu, and the accumulation in progress restarts
    there: the model then trains as a cpu model from the same weights would."""
    stand_in.fail = ("evaluate", "sdpaFwd", 2 * TINY.n_layers)   # fails in the third microstep
    t = Trainer(TINY, TrainConfig(steps=3, accum=1, backend="auto", ckpt_path=None,
                                  loss_scale=1.0), log=lambda s: None)
    t.step()
    t.step()
    assert t.backend == "ane"
    before = t.model.params.copy()
    t.step()
    assert t.backend == "cpu"
    assert not np.array_equal(t.model.params, before) and np.all(np.isfinite(t.model.params))
