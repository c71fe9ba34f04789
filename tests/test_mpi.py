"""Data-parallel training over MPI (anecy.distributed), run through mpirun: N ranks with
--accum k train the weights one process trains with --accum N*k, in full and LoRA training; a
checkpoint resumes on another number of ranks; a rank killed or hung stops the others within
the bound, with one line and the checkpoint intact; ranks that disagree are refused."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from anecy.checkpoint import load_checkpoint, read_checkpoint_meta
from conftest import require_module, require_tool

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "train_stories.py")
# a tiny model on short windows: 20 updates of 10 windows take seconds
MODEL = ["--preset", "tiny", "--seq-len", "32"]          # a new run's (a resume keeps them)
FLAGS = ["--lr", "2e-3", "--warmup", "20", "--seed", "3", "--no-progress"]


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("ANECY_DATA",)}
    # mpirun refuses root without these (CI runs as root); one BLAS thread a rank
    e.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
             OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return e


@pytest.fixture(scope="module")
def mpirun():
    path = require_tool("mpirun", "apt-get install openmpi-bin libopenmpi-dev",
                        "the data-parallel runs are launched by MPI")
    require_module("mpi4py", "pip install 'anecy[mpi]'", "anecy's MPI binding")
    return path


def launch(mpirun, n, *args, cwd):
    """argv of train_stories.py on n ranks (n = 0: one process, no launcher)."""
    cmd = [sys.executable, TRAIN, *([] if "--resume" in args else MODEL), *FLAGS, *args]
    if n:
        cmd = [mpirun, "-n", str(n), "--oversubscribe", *cmd]
    return cmd


def train(mpirun, n, *args, cwd, ok=True):
    r = subprocess.run(launch(mpirun, n, *args, cwd=cwd), cwd=cwd, env=env(),
                       capture_output=True, text=True, timeout=600)
    if ok:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def weights(ckpt):
    arrays = load_checkpoint(ckpt)[1]
    return arrays["adapters"] if "adapters" in arrays else arrays["params"]


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_two_ranks_train_what_one_process_does_and_resume_on_one(tmp_path, mpirun):
    """2 ranks x accum 5 == 1 process x accum 10 after 20 updates; only rank 0 writes; the
    2-rank checkpoint, resumed in one process, continues as the 2 ranks would."""
    one, two = tmp_path / "one.ckpt", tmp_path / "two.ckpt"
    train(mpirun, 0, "--steps", "200", "--accum", "10", "--ckpt", str(one), cwd=tmp_path)
    r = train(mpirun, 2, "--steps", "200", "--accum", "5", "--ckpt", str(two),
              "--metrics", str(tmp_path / "two.jsonl"), cwd=tmp_path)
    start = rel(weights(two), weights(one))
    assert start < 1e-6, start
    meta = read_checkpoint_meta(two)["meta"]
    assert (meta["world_size"], meta["step"], meta["updates"]) == (2, 200, 20)
    # rank 0 alone prints and writes: one report, one metrics line per microstep (2 windows)
    assert r.stdout.count("=== Efficiency Report ===") == 1
    steps = [int(line.split('"step": ')[1].split(",")[0])
             for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert steps == list(range(2, 201, 2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.ckpt", "two.ckpt", "two.jsonl"]

    half = tmp_path / "half.ckpt"
    train(mpirun, 2, "--steps", "100", "--accum", "5", "--ckpt", str(half), cwd=tmp_path)
    on_two = tmp_path / "on_two.ckpt"
    (tmp_path / "on_one.ckpt").write_bytes(half.read_bytes())
    on_two.write_bytes(half.read_bytes())
    r = train(mpirun, 0, "--resume", "--steps", "200", "--accum", "10",
              "--ckpt", str(tmp_path / "on_one.ckpt"), cwd=tmp_path)
    assert "checkpoint written by 2 ranks" not in r.stdout   # a single process says nothing
    train(mpirun, 2, "--resume", "--steps", "200", "--accum", "5", "--ckpt", str(on_two),
          cwd=tmp_path)
    assert read_checkpoint_meta(tmp_path / "on_one.ckpt")["meta"]["world_size"] == 1
    d = rel(weights(tmp_path / "on_one.ckpt"), weights(on_two))
    assert d < 1e-6, d


def test_three_ranks(tmp_path, mpirun):
    """3 ranks (no power of two) x accum 2 == 1 process x accum 6."""
    one, three = tmp_path / "one.ckpt", tmp_path / "three.ckpt"
    train(mpirun, 0, "--steps", "120", "--accum", "6", "--ckpt", str(one), cwd=tmp_path)
    r = train(mpirun, 3, "--steps", "120", "--accum", "2", "--ckpt", str(three),
              cwd=tmp_path)
    assert "data parallel: 3 ranks" in r.stdout and "MB per update" in r.stdout
    assert read_checkpoint_meta(three)["meta"]["updates"] == 20
    d = rel(weights(three), weights(one))
    assert d < 1e-6, d


def test_lora_two_ranks_train_what_one_process_does(tmp_path, mpirun):
    """LoRA adapters (only theirs are summed) on a base (an anecy checkpoint's weights),
    with dropout (each window's masks follow the window, whichever rank takes it):
    2 ranks x accum 5 == 1 process x accum 10 after 20 updates."""
    base = tmp_path / "base.ckpt"
    train(mpirun, 0, "--steps", "3", "--accum", "1", "--ckpt", str(base), cwd=tmp_path)
    lora = ["--init-from", str(base), "--lora", "--lora-rank", "4", "--lora-dropout", "0.1"]
    one, two = tmp_path / "one.ckpt", tmp_path / "two.ckpt"
    train(mpirun, 0, *lora, "--steps", "200", "--accum", "10", "--ckpt", str(one),
          cwd=tmp_path)
    r = train(mpirun, 2, *lora, "--steps", "200", "--accum", "5", "--ckpt", str(two),
              cwd=tmp_path)
    # the all-reduce carries the adapters' gradients alone: 4 bytes a parameter
    a, b = weights(two), weights(one)
    assert f"{a.nbytes / 1e6:.1f} MB per update" in r.stdout, r.stdout
    assert np.abs(a).max() > 0 and read_checkpoint_meta(two)["meta"]["updates"] == 20
    assert rel(a, b) < 1e-6, rel(a, b)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_ranks_on_the_sim_backend(tmp_path, mpirun, lora):
    """The sim backend (the ten programs in emulated fp16, weights staged after each update;
    LoRA's merged into them) under 2 ranks x accum 2 trains what one sim process does with
    accum 4. The ranks' fp32 gradient sums differ from one process's in order alone, and an
    fp16 staging can round such a difference either way, hence a bound far above the cpu
    runs' 1e-6: measured after the 10 updates, 1.4e-5 (full) and 1.1e-4 (LoRA, whose
    adapters start from zero) with the one process on two BLAS threads, against 1.7e-2 and
    4.2e-2 for one process trained on half of the windows."""
    sim = ["--backend", "sim"]
    if lora:
        base = tmp_path / "base.ckpt"
        train(mpirun, 0, "--steps", "3", "--accum", "1", "--ckpt", str(base), cwd=tmp_path)
        sim += ["--init-from", str(base), "--lora", "--lora-rank", "4"]
    one, two = tmp_path / "one.ckpt", tmp_path / "two.ckpt"
    train(mpirun, 0, *sim, "--steps", "40", "--accum", "4", "--ckpt", str(one), cwd=tmp_path)
    r = train(mpirun, 2, *sim, "--steps", "40", "--accum", "2", "--ckpt", str(two),
              cwd=tmp_path)
    assert "data parallel: 2 ranks" in r.stdout, r.stdout
    meta_one, meta_two = (read_checkpoint_meta(p)["meta"] for p in (one, two))
    assert (meta_two["world_size"], meta_two["updates"]) == (2, 10)
    assert meta_two["loss_scale"] == meta_one["loss_scale"]
    a, b = weights(two), weights(one)
    assert np.abs(a).max() > 0
    assert rel(a, b) < 1e-3, rel(a, b)


def _parent(pid):
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _rank_pid(launcher_pid, rank):
    """The pid of rank `rank` of the mpirun `launcher_pid`: a descendant of it whose MPI
    environment names that rank."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            env_ = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"OMPI_COMM_WORLD_RANK={rank}".encode() not in env_:
            continue
        ancestor = int(p.name)
        for _ in range(4):
            ancestor = _parent(ancestor)
            if ancestor == launcher_pid:
                return int(p.name)
            if ancestor is None:
                break
    return None


def _wait_for(path, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.05)


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_lost_rank_stops_the_run_within_the_bound(tmp_path, mpirun, fault):
    """Rank 1 killed (-9) or stopped (SIGSTOP) mid-run: rank 0 stops within the bound with
    one line naming rank 1, a non-zero status, and a checkpoint that resumes."""
    ckpt = tmp_path / "run.ckpt"
    bound = 5
    proc = subprocess.Popen(
        launch(mpirun, 2, "--steps", "100000", "--accum", "2", "--ckpt", str(ckpt),
               "--ckpt-every", "20", "--mpi-timeout", str(bound), cwd=tmp_path),
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    victim = None
    try:
        _wait_for(ckpt, proc)
        victim = _rank_pid(proc.pid, 1)
        assert victim is not None
        t0 = time.monotonic()
        os.kill(victim, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        try:
            out, err = proc.communicate(timeout=bound + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"the run did not stop: {err[-3000:]}")
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if victim is not None and fault == "hung":
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode != 0
    ours = [line for line in err.splitlines() if "did not complete" in line]
    assert len(ours) == 1, err
    assert "rank 1 of 2 did not complete" in ours[0] and "run.ckpt" in ours[0], ours[0]
    assert elapsed < bound + 15, elapsed
    # intact: a single process resumes it and trains on
    step = read_checkpoint_meta(ckpt)["meta"]["step"]
    steps = step + 4
    train(mpirun, 0, "--resume", "--steps", str(steps), "--ckpt", str(ckpt), cwd=tmp_path)
    assert read_checkpoint_meta(ckpt)["meta"]["step"] == steps


def test_ranks_that_disagree_are_refused(tmp_path, mpirun):
    """Two ranks given different flags (MPMD launch): refused at start, one line."""
    ckpt = str(tmp_path / "x.ckpt")
    one = [sys.executable, TRAIN, *MODEL, *FLAGS, "--steps", "10", "--ckpt", ckpt]
    cmd = [mpirun, "--oversubscribe", "-n", "1", *one, "--lr", "1e-3", ":", "-n", "1", *one,
           "--lr", "2e-3"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0
    ours = [line for line in r.stderr.splitlines() if "error:" in line]
    assert ours == ["train_stories.py: error: rank 1 has other settings than rank 0: every "
                    "rank must run the same anecy with the same flags, data and weights"], \
        r.stderr
    assert not Path(ckpt).exists()


def test_bench_dp_quick(tmp_path, mpirun):
    """bench/bench_dp.py --quick measures both sides and prints the paper table; its
    all-reduce carries the tiny model's gradients (4 bytes a parameter) once an update."""
    import json

    from anecy import ModelConfig
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_dp.py"), "--quick",
                        "--gflops", "1000", "--json", str(tmp_path / "b.json")],
                       cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for text in ("| 1 process x 2 threads |", "| 2 ranks x 1 thread |", "| Qwen3-0.6B | LoRA |",
                 "| Stories110M | full |", "8 x 40 Gbit/s", "machines given by --gflops"):
        assert text in r.stdout, text
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["two_ranks"]["allreduce_bytes"] == 4 * ModelConfig.preset("tiny").n_params
    assert b["one_process"]["ms_per_update"] > 0 and b["two_ranks"]["allreduce_ms"] > 0
    paper = b["paper"]["given"]
    # a faster machine spends relatively longer in the all-reduce; more links, less
    by = {(p["model"], p["mode"], p["machines"], p["gbit"]): p["speedup"] for p in paper}
    assert by[("Qwen3-0.6B", "full", 8, 1)] < by[("Qwen3-0.6B", "full", 8, 40)] <= 8
    assert by[("Qwen3-0.6B", "full", 8, 1)] < by[("Qwen3-0.6B", "LoRA", 8, 1)]


def test_a_single_process_never_loads_mpi(tmp_path):
    """Without a launcher anecy trains as one process and never imports mpi4py; under one
    (its environment) with no mpi4py, one line says what to install."""
    code = ("import sys; sys.modules['mpi4py'] = None\n"     # as if not installed
            "from anecy import ModelConfig, TrainConfig, Trainer\n"
            "t = Trainer(ModelConfig.preset('tiny'), TrainConfig(steps=2, accum=1), "
            "log=lambda *_: None)\n"
            "t.step(); assert t.dp is None and t.writes; print('ok')\n")
    e = env()
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        e.pop(var, None)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=e, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    r = subprocess.run([sys.executable, "-c", "import sys; sys.modules['mpi4py'] = None\n"
                        "from anecy.cli import main; sys.exit(main())", *MODEL, "--steps", "2"],
                       cwd=tmp_path, env=dict(e, OMPI_COMM_WORLD_SIZE="2"),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "train_stories.py: error: started by an MPI launcher as 2 processes, but mpi4py is "
        "not installed: pip install 'anecy[mpi]'"], r.stderr


def test_two_ranks_on_an_examples_file(tmp_path, mpirun):
    """On examples (masked loss, packed windows, the gradient normalised over the scored
    tokens of the whole update): 2 ranks x accum 5 == 1 process x accum 10."""
    from test_examples_train import make_examples, write_examples

    vocab = 32000
    data = write_examples(tmp_path / "ex.bin",
                          make_examples(np.random.default_rng(0), 300, 311), vocab, 32)
    one, two = tmp_path / "one.ckpt", tmp_path / "two.ckpt"
    flags = ["--data", str(data), "--steps", "100"]
    train(mpirun, 0, *flags, "--accum", "10", "--ckpt", str(one), cwd=tmp_path)
    r = train(mpirun, 2, *flags, "--accum", "5", "--ckpt", str(two), cwd=tmp_path)
    assert "useful" in r.stdout
    d = rel(weights(two), weights(one))
    assert d < 1e-6, d


def test_a_stop_inside_an_accumulation_saves_the_ranks_summed_gradients(tmp_path, mpirun):
    """SIGTERM to every rank mid-run: they stop after the same microstep, rank 0 saves the
    gradients summed over the ranks, and one process resuming it ends where one process
    running straight through does."""
    ckpt, metrics = tmp_path / "run.ckpt", tmp_path / "run.jsonl"
    flags = ["--steps", "1500", "--warmup", "100"]
    proc = subprocess.Popen(
        launch(mpirun, 2, *flags, "--accum", "5", "--ckpt", str(ckpt), "--metrics",
               str(metrics), cwd=tmp_path),
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(metrics, proc)
        while len(metrics.read_text().splitlines()) < 30:
            assert proc.poll() is None
            time.sleep(0.02)
        for rank in (0, 1):
            os.kill(_rank_pid(proc.pid, rank), signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "stopped at step" in out, err
    meta = read_checkpoint_meta(ckpt)["meta"]
    assert meta["world_size"] == 2 and meta["step"] < 1500
    straight = tmp_path / "straight.ckpt"
    train(mpirun, 0, *flags, "--accum", "10", "--ckpt", str(straight), cwd=tmp_path)
    train(mpirun, 0, "--resume", *flags, "--accum", "10", "--ckpt", str(ckpt), cwd=tmp_path)
    d = rel(weights(ckpt), weights(straight))
    assert d < 1e-6, (d, meta["pending"])


def test_each_rank_writes_its_own_trace_with_the_all_reduce(tmp_path, mpirun):
    """--trace under mpirun: one Chrome trace per rank (FILE.rankN.json), each holding the
    gradients' all-reduce of the traced update as a slice on the main track."""
    import json
    train(mpirun, 2, "--steps", "8", "--accum", "2", "--trace", str(tmp_path / "t.json"),
          "--trace-steps", "1-4", "--ckpt", str(tmp_path / "run.ckpt"), cwd=tmp_path)
    assert not (tmp_path / "t.json").exists()
    for rank in (0, 1):
        events = json.loads((tmp_path / f"t.rank{rank}.json").read_text())["traceEvents"]
        assert any(e.get("name") == "allreduce" and e.get("ph") == "X" for e in events), rank
        assert {e["pid"] for e in events} == {rank}
