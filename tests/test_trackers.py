"""--report-to: TensorBoard and Weights & Biases, read back with their own readers, hold what
the metrics file holds; a tracker that fails or hangs never stops a run; one that is not
installed is refused before any work."""
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from anecy import cli, trackers
from anecy.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--preset", "tiny", "--steps", "4", "--eval-every", "2", "--accum", "2",
       "--no-progress", "--metrics", "m.jsonl"]


@pytest.fixture(autouse=True)
def wandb_offline_and_contained(monkeypatch, tmp_path):
    """No W&B login here (so runs are offline), and W&B's own files stay in tmp_path."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))


def train(tmp_path, monkeypatch, *flags):
    monkeypatch.chdir(tmp_path)
    return cli.main([*RUN, *flags], family="stories")


# the metrics file's fields and the tags the trackers show them under
TAGS = {"loss": "train/loss", "val_loss": "eval/loss", "lr": "train/lr",
        "grad_norm": "train/grad_norm", "loss_scale": "train/loss_scale",
        "tokens_per_s": "train/tokens_per_s", "ms": "time_ms/step"}


def metrics_scalars(tmp_path) -> dict:
    """{tag: {step: value}} of every number the metrics file holds (the held-out loss and
    grad norm where there is one; each component's ms as time_ms/<component>)."""
    scalars = {}
    for line in (tmp_path / "m.jsonl").read_text().splitlines():
        rec = json.loads(line)
        numbers = {TAGS[k]: v for k, v in rec.items() if k in TAGS and v is not None}
        numbers.update({f"time_ms/{k}": v for k, v in rec["timings"].items()})
        for tag, value in numbers.items():
            scalars.setdefault(tag, {})[rec["step"]] = value
    return scalars


def check_scalars(got: dict, want: dict, rel: float):
    assert set(got) == set(want)
    for tag in want:
        assert got[tag] == pytest.approx(want[tag], rel=rel, abs=1e-12), tag
    assert sorted(want["train/loss"]) == [1, 2, 3, 4]          # every microstep
    assert sorted(want["eval/loss"]) == [2, 4]                  # each evaluation
    assert sorted(want["train/grad_norm"]) == [2, 4]            # each update (accum 2)
    assert {"time_ms/step", "time_ms/kernels", "time_ms/optimizer"} <= set(want)


def test_tensorboard_reads_back_every_scalar_and_the_configs(tmp_path, monkeypatch, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata
    assert train(tmp_path, monkeypatch, "--report-to", "tensorboard") == 0
    assert "warning" not in capsys.readouterr().err
    acc = EventAccumulator(str(tmp_path / "runs" / "stories"))
    acc.Reload()
    got = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    check_scalars(got, metrics_scalars(tmp_path), rel=1e-6)   # event files hold float32
    (content,) = acc.PluginTagToContent(metadata.PLUGIN_NAME).values()
    hparams = metadata.parse_session_start_info_plugin_data(content).hparams
    assert hparams["model/dim"].number_value == ModelConfig.preset("tiny").dim
    assert hparams["train/steps"].number_value == 4
    assert hparams["train/metrics_path"].string_value == "m.jsonl"


def tensorboard_steps(directory, tag="train/loss") -> list:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(directory))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_a_resumed_run_reports_on_unless_told_none(tmp_path, monkeypatch):
    assert train(tmp_path, monkeypatch, "--report-to", "tensorboard") == 0
    resume = ["--resume", "--no-progress"]
    assert cli.main([*resume, "--steps", "6"], family="stories") == 0   # the checkpoint's
    assert tensorboard_steps(tmp_path / "runs" / "stories") == [1, 2, 3, 4, 5, 6]
    assert cli.main([*resume, "--steps", "7", "--report-to", "none"], family="stories") == 0
    assert tensorboard_steps(tmp_path / "runs" / "stories") == [1, 2, 3, 4, 5, 6]
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 7


def wandb_records(run_file: Path) -> list:
    """The records of a W&B run file, as wandb's own reader (``wandb leet inspect``) gives
    them."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json",
                           str(run_file)], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_wandb_offline_run_holds_every_scalar_and_the_configs(tmp_path, monkeypatch, capsys):
    assert train(tmp_path, monkeypatch, "--report-to", "wandb") == 0
    assert "warning" not in capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs" / "stories" / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    records = wandb_records(run_file)
    got = {}
    for record in records:
        if record["type"] == "history":
            items = dict(record["history"]["item"])
            step = items.pop("_step")
            for tag, value in items.items():
                if not tag.startswith("_"):              # W&B's own (_runtime, _timestamp)
                    got.setdefault(tag, {})[step] = value
    check_scalars(got, metrics_scalars(tmp_path), rel=1e-12)  # JSON: the float64 itself
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["display_name"] == "stories" and run["telemetry"]["feature"]["offline"]
    config = run["config"]["update"]
    assert config["model"] == ModelConfig.preset("tiny").to_dict()
    assert config["train"]["steps"] == 4 and config["train"]["trackers"] == ["wandb"]


@pytest.mark.parametrize("method", ["start", "log", "finish"])
def test_a_tracker_that_raises_is_one_warning_and_training_goes_on(tmp_path, monkeypatch,
                                                                  capsys, method):
    calls = []
    real = getattr(trackers.TensorBoard, method)

    def failing(self, *args):
        real(self, *args)
        calls.append(args)
        raise RuntimeError("the disk is on fire\nand a second line")

    monkeypatch.setattr(trackers.TensorBoard, method, failing)
    assert train(tmp_path, monkeypatch, "--report-to", "tensorboard") == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1, warnings
    assert f"tensorboard failed at its {method} (RuntimeError: the disk is on fire and a " \
        "second line); training goes on without it" in warnings[0]
    assert len(calls) == 1                                    # dropped after its failure
    assert (tmp_path / "stories.ckpt").exists()
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 4


def test_a_tracker_that_hangs_holds_up_neither_the_run_nor_the_other(tmp_path, monkeypatch,
                                                                    capsys):
    release = threading.Event()

    def log(self, step, scalars):
        release.wait(60)   # a network that does not answer

    monkeypatch.setattr(trackers.TensorBoard, "log", log)
    monkeypatch.setattr(trackers, "FINISH_TIMEOUT_S", 10)
    try:
        assert train(tmp_path, monkeypatch, "--report-to", "tensorboard,wandb") == 0
    finally:
        release.set()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "tensorboard still writing after 10 s" in warnings[0]
    assert (tmp_path / "stories.ckpt").exists()
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 4
    (run_file,) = (tmp_path / "runs" / "stories" / "wandb").glob("offline-run-*/run-*.wandb")
    assert [r["history"]["item"]["_step"] for r in wandb_records(run_file)
            if r["type"] == "history"] == [1, 2, 3, 4]


@pytest.mark.parametrize("name, failure, words", [
    (name, "ImportError('not installed')", f"needs the {name} package")
    for name in trackers.NAMES
] + [("wandb", "TypeError('a broken protobuf')", "fails to import (TypeError: a broken protobuf)")])
def test_a_tracker_not_installed_or_broken_is_refused_up_front(tmp_path, name, failure, words):
    fake = tmp_path / "site"      # a module of the tracker's name that fails to import
    (fake / name).mkdir(parents=True)
    (fake / name / "__init__.py").write_text(f"raise {failure}\n")
    proc = subprocess.run([sys.executable, str(ROOT / "train_stories.py"), *RUN,
                           "--report-to", "tensorboard,wandb"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(fake)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert f"--report-to {name}" in line and words in line, line
    assert line.endswith(f'pip install "anecy[{name}]"'), line
    assert not (tmp_path / "stories.ckpt").exists() and not (tmp_path / "runs").exists()


def test_an_unknown_tracker_is_one_line(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exited:
        train(tmp_path, monkeypatch, "--report-to", "tensorboard,mlflow")
    assert exited.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "error" in line and "unknown tracker 'mlflow'" in line, line


@pytest.mark.parametrize("report_dir", ["m.jsonl", "m.jsonl/run"])
def test_a_report_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch, capsys,
                                                         report_dir):
    (tmp_path / "m.jsonl").write_text("")
    assert train(tmp_path, monkeypatch, "--report-to", "tensorboard",
                 "--report-dir", report_dir) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "error: cannot write the tracker output" in line \
        and "m.jsonl is not a directory" in line, line
    assert not (tmp_path / "stories.ckpt").exists()


def test_wandb_is_online_only_after_a_login(tmp_path, monkeypatch):
    assert not trackers.wandb_logged_in()
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert trackers.wandb_logged_in()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert not trackers.wandb_logged_in()                     # a key for another host
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert trackers.wandb_logged_in()
