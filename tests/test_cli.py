"""train_stories.py as a user runs it: flags, errors, progress output, kill and resume."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from anecy.checkpoint import load_checkpoint
from conftest import IN_CI

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "train_stories.py")


def run(args, cwd, **kw):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, **kw)


def one_line_error(proc):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["--steps", "0"], "positive integer"),
    (["--steps", "ten"], "positive integer"),
    (["--lr", "nan"], "finite"),
    (["--preset", "gpt5"], "invalid choice"),
    (["--bogus"], "unrecognized"),
    (["--clip", "-1", "--preset", "tiny"], "clip"),
    (["--resume", "--scratch"], "contradict"),
    (["--resume", "--ckpt", "nowhere.ckpt"], "no checkpoint"),
    (["--data", "missing.bin", "--preset", "tiny"], "no such token file"),
    (["--backend", "ane", "--preset", "tiny"], "ane backend"),
])
def test_bad_input_is_one_line_and_status_2(tmp_path, args, words):
    assert words in one_line_error(run(args, tmp_path))


def test_bad_data_files(tmp_path):
    (tmp_path / "odd.bin").write_bytes(b"\x01\x00\x02")
    assert "odd length" in one_line_error(run(["--data", "odd.bin", "--preset", "tiny"], tmp_path))
    np.full(1000, 40000, np.uint16).tofile(tmp_path / "oov.bin")
    assert "not below" in one_line_error(run(["--data", "oov.bin", "--preset", "tiny"], tmp_path))
    np.arange(10, dtype=np.uint16).tofile(tmp_path / "short.bin")
    assert "need at least" in one_line_error(run(["--data", "short.bin", "--preset", "tiny"],
                                                 tmp_path))
    (tmp_path / "bad.ckpt").write_bytes(b"garbage" * 100)
    assert "checkpoint" in one_line_error(run(["--resume", "--ckpt", "bad.ckpt", "--preset",
                                               "tiny"], tmp_path))


def test_a_run_prints_progress_and_the_report(tmp_path):
    proc = run(["--preset", "tiny", "--steps", "20", "--accum", "2", "--metrics", "m.jsonl"],
               tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert "built-in corpus" in out and "vocab compaction: 32000 ->" in out
    assert "step 10 loss" in out and "dw_wait=" in out and "ms/step" in out
    assert "=== Efficiency Report ===" in out and "GFLOP/s" in out
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 20
    assert (tmp_path / "stories.ckpt").exists()
    # a finished run resumed with more steps continues from where it stopped
    proc = run(["--preset", "tiny", "--resume", "--steps", "25", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resumed at step 20" in proc.stdout


def test_resume_of_another_preset_is_refused(tmp_path):
    assert run(["--preset", "tiny", "--steps", "2", "--no-progress"], tmp_path).returncode == 0
    line = one_line_error(run(["--preset", "stories15m", "--resume", "--no-progress"], tmp_path))
    assert "another model" in line


def final_params(path):
    _, arrays = load_checkpoint(path)
    return arrays["params"]


def wait_for(path, proc, timeout=300):
    start = time.time()
    while not path.exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() - start < timeout
        time.sleep(0.05)


def test_killed_and_resumed_ends_where_an_uninterrupted_run_ends(tmp_path):
    # stories15m steps take long enough to kill the run between its two checkpoints
    args = ["--preset", "stories15m", "--steps", "6", "--ckpt-every", "3", "--accum", "2",
            "--no-progress"]
    straight = tmp_path / "straight"
    straight.mkdir()
    assert run(args, straight).returncode == 0

    killed = tmp_path / "killed"
    killed.mkdir()
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=killed,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(killed / "stories.ckpt", proc)
    proc.kill()  # no chance to save: the resume starts from the step-3 checkpoint
    proc.wait()
    resumed = run(args + ["--resume"], killed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed at step 3" in resumed.stdout
    assert np.array_equal(final_params(killed / "stories.ckpt"),
                          final_params(straight / "stories.ckpt"))


def test_ctrl_c_saves_and_exits_cleanly(tmp_path):
    args = ["--preset", "stories15m", "--steps", "400", "--ckpt-every", "2", "--no-progress"]
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "stories.ckpt", proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "stopped at step" in out and "--resume" in out
    step = int(out.split("stopped at step ")[1].split(";")[0])
    assert 2 <= step < 400
    meta, _ = load_checkpoint(tmp_path / "stories.ckpt")
    assert meta["step"] == step
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def run_anecy(args, cwd, **kw):
    # -m finds this checkout's anecy from another directory only through PYTHONPATH
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "anecy", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, PYTHONPATH=path), **kw)


def test_anecy_command_trains_and_lists_commands(tmp_path):
    listed = run_anecy(["--help"], tmp_path)
    assert listed.returncode == 0 and "train" in listed.stdout
    bare = run_anecy([], tmp_path)
    assert bare.returncode == 2 and "usage: anecy" in bare.stderr
    # every preset is offered; the checkpoint is named after the preset's family
    done = run_anecy(["train", "--preset", "qwen3-tiny", "--steps", "2", "--accum", "1",
                      "--no-progress"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "qwen.ckpt").is_file() and not (tmp_path / "stories.ckpt").exists()
    bad = run_anecy(["train", "--steps", "0"], tmp_path)
    assert one_line_error(bad).startswith("anecy train: error:")


# Run in a fresh interpreter: every --help the command line offers, then the names of the
# modules it loaded that are compiled (anecy's Cython core) or SciPy.
HELP_IMPORTS = """
import contextlib, io, sys
from anecy import cli
with contextlib.redirect_stdout(io.StringIO()) as text:
    for argv in (["--help"], *([name, "--help"] for name in cli.COMMANDS)):
        with contextlib.suppress(SystemExit):
            cli.anecy_main(argv)
    for family in ("stories", "qwen"):
        with contextlib.suppress(SystemExit):
            cli.main(["--help"], family=family)
assert "usage: train_qwen.py" in text.getvalue(), text.getvalue()
print(sorted(name for name, module in list(sys.modules.items())
             if name.split(".")[0] == "scipy" or name.startswith("anecy._")
             or name.startswith("anecy") and str(getattr(module, "__file__", "")).endswith(".so")))
"""


def test_help_loads_no_compiled_module():
    proc = subprocess.run([sys.executable, "-c", HELP_IMPORTS], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_package_exports_load_on_first_use():
    import anecy
    from anecy import Model, ModelConfig, TrainConfig, Trainer, TrainingDiverged
    from anecy.model import Model as model_class
    from anecy.trainer import Trainer as trainer_class
    assert Model is model_class and Trainer is trainer_class
    assert ModelConfig.preset("tiny").dim == 64 and TrainConfig().steps > 0
    assert issubclass(TrainingDiverged, anecy.AnecyError)
    assert set(anecy.__all__) <= set(dir(anecy))
    with pytest.raises(AttributeError):
        anecy.no_such_name  # noqa: B018


def test_flag_defaults_come_from_train_config():
    from anecy import TrainConfig
    from anecy.commands import train
    from anecy.commands._args import Parser
    p = Parser()
    train.add_arguments(p, family="stories")
    helps = {a.dest: a.help for a in p._actions}
    d = TrainConfig()
    for dest, value in (("ckpt_every", d.ckpt_every), ("steps", d.steps), ("lr", d.lr),
                        ("accum", d.accum), ("eval_every", d.eval_every)):
        assert f"(default {value})" in helps[dest], (dest, helps[dest])


# -- never lose a good model ----------------------------------------------------------------
def checkpoint_state(path):
    meta, arrays = load_checkpoint(path)
    return meta["step"], arrays


@pytest.mark.parametrize("lr", ["1e6", "1e30"])
def test_a_diverging_run_keeps_the_last_good_checkpoint(tmp_path, lr):
    # 1e6 gives finite but absurd weights, then a NaN loss one step later; 1e30 makes the
    # parameters themselves infinite. Either way the checkpoint left must train on.
    base = ["--preset", "tiny", "--accum", "1", "--warmup", "0", "--no-progress"]
    assert run(base + ["--steps", "10"], tmp_path).returncode == 0
    line = one_line_error(run(base + ["--resume", "--lr", lr, "--steps", "40",
                                      "--ckpt-every", "1"], tmp_path))
    assert "the last good state is checkpoint stories.ckpt (step " in line, line
    named = int(line.split("(step ")[1].split(")")[0])
    step, arrays = checkpoint_state(tmp_path / "stories.ckpt")
    assert step == named
    for name in ("params", "adam_m", "adam_v"):
        assert np.isfinite(arrays[name]).all(), name
    sane = run(base + ["--resume", "--lr", "3e-4", "--steps", str(step + 5)], tmp_path)
    assert sane.returncode == 0, sane.stderr
    assert "nan" not in sane.stdout.lower() and f"resumed at step {step}" in sane.stdout
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_killed_saves_are_removed_at_start_up(tmp_path):
    dead = dead_pid()
    leftover = tmp_path / f"stories.ckpt.tmp-{dead}"
    leftover.write_bytes(b"x" * 1000)
    # not ours to touch: another file's temporary, a live writer's, a name off the pattern
    keep = [tmp_path / f"other.ckpt.tmp-{dead}", tmp_path / f"stories.ckpt.tmp-{os.getpid()}",
            tmp_path / "stories.ckpt.tmp-x1", tmp_path / f"stories.ckpt.tmp-{dead}.bak"]
    for p in keep:
        p.write_bytes(b"keep")
    proc = run(["--preset", "tiny", "--steps", "1", "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not leftover.exists() and f"removed {leftover.name}" in proc.stdout
    assert all(p.read_bytes() == b"keep" for p in keep)


def test_kill_9_inside_a_save_leaves_the_checkpoint_and_start_up_cleans_up(tmp_path):
    args = ["--preset", "tiny", "--steps", "400", "--accum", "1", "--ckpt-every", "3",
            "--no-progress"]
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "stories.ckpt"
    try:
        wait_for(ckpt, proc)
        start = time.time()
        while not [p for p in os.listdir(tmp_path) if ".tmp-" in p]:
            assert proc.poll() is None and time.time() - start < 300
            time.sleep(0.001)
        proc.kill()  # inside a save: its temporary exists, the rename has not run
    finally:
        proc.kill()
        proc.wait()
    assert [p for p in os.listdir(tmp_path) if ".tmp-" in p], "the kill missed the save"
    # the checkpoint the save was replacing is whole (it loads, at a save's step); tiny steps
    # are quick, so which save that was is read from the file itself
    step_before = checkpoint_state(ckpt)[0]
    assert step_before >= 3 and step_before % 3 == 0
    before = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    # start-up of the next run removes the leftover; with no steps left it writes nothing
    again = run(["--resume", "--steps", "3", "--no-progress"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert hashlib.sha256(ckpt.read_bytes()).hexdigest() == before
    assert checkpoint_state(ckpt)[0] == step_before


def test_a_second_sigterm_waits_for_the_final_save(tmp_path):
    # stories15m's checkpoint (~180 MB) takes long enough to write to be hit inside
    args = ["--preset", "stories15m", "--steps", "400", "--accum", "1", "--ckpt-every", "0",
            "--metrics", "m.jsonl", "--no-progress"]
    proc = subprocess.Popen([sys.executable, SCRIPT, *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        start = time.time()  # a first metrics line: training (and its signal handling) runs
        while not (tmp_path / "m.jsonl").exists() or not (tmp_path / "m.jsonl").read_text():
            assert proc.poll() is None and time.time() - start < 300
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        start = time.time()
        while not [p for p in os.listdir(tmp_path) if ".tmp-" in p]:
            assert proc.poll() is None and time.time() - start < 300
            time.sleep(0.001)
        proc.send_signal(signal.SIGTERM)  # inside the final save
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "waited for it to finish" in out
    step = int(out.split("stopped at step ")[1].split(";")[0])
    assert checkpoint_state(tmp_path / "stories.ckpt")[0] == step
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


@pytest.mark.parametrize("flag, path, words", [
    ("--ckpt", "afile/run.ckpt", "afile is not a directory"),
    ("--ckpt", "/proc/run.ckpt", "cannot write the checkpoint"),
    ("--ckpt", ".", "is a directory"),
    ("--metrics", "nodir/m.jsonl", "no directory nodir"),
    ("--metrics", ".", "is a directory"),
    ("--metrics", "/proc/x", "cannot write the metrics file /proc/x"),
])
def test_unwritable_outputs_are_found_before_training(tmp_path, flag, path, words):
    (tmp_path / "afile").write_text("a file, not a directory")
    proc = run(["--preset", "tiny", "--steps", "50", "--ckpt-every", "0", flag, path,
                "--no-progress"], tmp_path)
    assert words in one_line_error(proc)
    assert "step " not in proc.stdout and "model:" not in proc.stdout  # nothing was computed
    assert not (tmp_path / "stories.ckpt").exists()


@pytest.mark.skipif(not os.path.exists("/dev/full") and not IN_CI,
                    reason="needs /dev/full (Linux)")
def test_metrics_to_a_full_disk_stop_the_run_and_keep_the_model(tmp_path):
    proc = run(["--preset", "tiny", "--steps", "50", "--accum", "1", "--metrics", "/dev/full",
                "--no-progress"], tmp_path)
    line = one_line_error(proc)
    assert "/dev/full" in line and "stopped at step 1" in line and "stories.ckpt" in line
    assert checkpoint_state(tmp_path / "stories.ckpt")[0] == 1


def test_fp16_backends_scale_the_loss_dynamically_unless_told(tmp_path):
    base = ["--preset", "tiny", "--backend", "sim", "--steps", "2", "--accum", "1",
            "--no-progress"]
    dynamic = run(base, tmp_path)
    assert dynamic.returncode == 0, dynamic.stderr
    assert "dynamic loss scale, now 4096" in dynamic.stdout
    assert "loss scale:      dynamic, now 4096 (0 updates skipped" in dynamic.stdout
    assert "2 optimizer updates, 0 skipped" in dynamic.stdout
    static = run(base + ["--loss-scale", "1024", "--ckpt", "static.ckpt"], tmp_path)
    assert static.returncode == 0, static.stderr
    assert "(loss scale 1024)" in static.stdout and "dynamic" not in static.stdout
    assert "positive" in one_line_error(run(base + ["--loss-scale", "0"], tmp_path))
    assert "auto" in one_line_error(run(base + ["--loss-scale", "dynamic"], tmp_path))
    # a resumed static run stays static, unless --loss-scale auto returns it to the
    # backend's dynamic scale, which then starts afresh
    more = ["--resume", "--ckpt", "static.ckpt", "--steps", "3"]
    again = run(base + more, tmp_path)
    assert again.returncode == 0, again.stderr
    assert "(loss scale 1024)" in again.stdout and "dynamic" not in again.stdout
    auto = run(base + more[:-1] + ["4", "--loss-scale", "auto"], tmp_path)
    assert auto.returncode == 0, auto.stderr
    assert "loss scale: dynamic from 4096 (the checkpoint's run used a static scale)" \
        in auto.stdout
    assert "loss scale:      dynamic, now 4096" in auto.stdout
    dyn = run(base + ["--resume", "--steps", "3", "--loss-scale", "auto"], tmp_path)
    assert dyn.returncode == 0, dyn.stderr
    assert "used a static scale" not in dyn.stdout and "dynamic loss scale" in dyn.stdout
