"""The experiment trackers a run reports to besides its metrics file (``--report-to``):
TensorBoard and Weights & Biases, each optional and in its own extra.

A tracker never holds training up and never stops it. The loop hands each StepRecord's
scalars to a queue, and one worker thread feeds the trackers from it, so a tracker that is
slow (a network, a full disk) costs the loop nothing. A tracker that raises, at its start, a
log or its finish, is one warning line on stderr and is dropped; the others and the run go
on. At the end the run waits at most ``FINISH_TIMEOUT_S`` for the trackers to finish writing.

Only the process that writes the metrics file reports to trackers (anecy trains in one)."""

import importlib
import os
import queue
import sys
import threading
import time
from pathlib import Path

NAMES = ("tensorboard", "wandb")
# what ``--report-to NAME`` needs importable (each NAME is also the extra that installs it)
MODULES = {"tensorboard": ("tensorboard.summary.writer.event_file_writer",
                           "tensorboard.plugins.hparams.summary_v2"),
           "wandb": ("wandb",)}
FINISH_TIMEOUT_S = 30.0     # the longest a run waits at its end for a tracker to finish
TENSORBOARD_FLUSH_S = 10    # TensorBoard's writer thread flushes its event file this often


def parse_names(text: str) -> tuple:
    """``--report-to``'s value: tracker names, comma-separated, or ``none``. ValueError
    names what is wrong."""
    names = tuple(n.strip() for n in text.split(","))
    if names == ("none",):
        return ()
    for n in names:
        if n not in NAMES:
            raise ValueError(f"unknown tracker {n!r}; known: {', '.join(NAMES)} (or none)")
    return tuple(dict.fromkeys(names))


def report_dir(tc) -> Path:
    """Where the trackers of the run configured by TrainConfig ``tc`` write: ``report_dir``,
    or ``runs/<checkpoint name without suffix>``."""
    if tc.report_dir:
        return Path(tc.report_dir)
    return Path("runs") / (Path(tc.ckpt_path).stem if tc.ckpt_path else "anecy")


def require(names) -> None:
    """Refuse (ConfigError, one line naming the extra) a tracker that is not installed."""
    from .errors import ConfigError
    for name in names:
        for module in MODULES[name]:
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(f"--report-to {name} needs the {name} package: "
                                  f'pip install "anecy[{name}]"') from None


def prepare(tc) -> None:
    """Before any work: the trackers ``tc`` names are installed and their directory can be
    written (an AnecyError, one line, otherwise)."""
    if not tc.trackers:
        return
    from .fileio import check_writable
    require(tc.trackers)
    # a file in the directory stands for what the trackers write there: check_writable
    # vets the directory (it exists or can be made, and takes files)
    check_writable(report_dir(tc) / "events.out.tfevents", what="tracker output",
                   make_parents=True)


def hyperparameters(configs: dict) -> dict:
    """``{"model": {...}, "train": {...}}`` flattened to ``{"model/dim": 64, ...}``, with
    values that are not numbers, strings or booleans written as strings."""
    flat = {}
    for section, values in configs.items():
        for k, v in values.items():
            flat[f"{section}/{k}"] = v if isinstance(v, (bool, int, float, str)) else str(v)
    return flat


class TensorBoard:
    """Event files in ``directory``, written with the ``tensorboard`` package's own event
    writer (no TensorFlow, no PyTorch): scalars per step, the configs as HParams."""
    name = "tensorboard"

    def __init__(self, directory):
        self.directory = Path(directory)
        self.writer = None

    def start(self, configs: dict):
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
        self.directory.mkdir(parents=True, exist_ok=True)
        self.writer = EventFileWriter(str(self.directory), flush_secs=TENSORBOARD_FLUSH_S)
        self._write(0, hparams_pb(hyperparameters(configs)))

    def log(self, step: int, scalars: dict):
        from tensorboard.compat.proto.summary_pb2 import Summary
        self._write(step, Summary(value=[Summary.Value(tag=tag, simple_value=v)
                                         for tag, v in scalars.items()]))

    def _write(self, step, summary):
        from tensorboard.compat.proto.event_pb2 import Event
        self.writer.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    def finish(self):
        if self.writer is not None:
            self.writer.close()


def wandb_logged_in() -> bool:
    """Whether Weights & Biases has an API key here: WANDB_API_KEY, or the netrc entry that
    ``wandb login`` writes for its host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandB:
    """A Weights & Biases run in ``directory``/wandb: offline unless the user has logged in
    (or WANDB_MODE says otherwise); an offline run can be uploaded later with
    ``wandb sync``. The configs are the run's config, the scalars its history."""
    name = "wandb"

    def __init__(self, directory, run_name: str):
        self.directory, self.run_name = Path(directory), run_name
        self.run = None

    def start(self, configs: dict):
        import wandb
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(dir=str(self.directory), mode=mode, name=self.run_name,
                              project=os.environ.get("WANDB_PROJECT") or "anecy",
                              config=configs,
                              # anecy's own output stays as it is: wandb neither prints nor
                              # wraps stdout/stderr (nor looks for a git repository)
                              settings=wandb.Settings(console="off", silent=True,
                                                      disable_git=True))

    def log(self, step: int, scalars: dict):
        self.run.log(scalars, step=step)

    def finish(self):
        if self.run is not None:
            self.run.finish()


def warn(message: str) -> None:
    """One line on stderr (above the progress bar, which tqdm redraws)."""
    from tqdm import tqdm
    tqdm.write("warning: " + " ".join(message.split()), file=sys.stderr)


def _failed(tracker, when: str, e: BaseException) -> None:
    why = " ".join(f"{type(e).__name__}: {e}".split())
    if len(why) > 200:
        why = why[:197] + "..."
    warn(f"{tracker.name} failed at its {when} ({why}); training goes on without it")


class Trackers:
    """The trackers of one run, fed by a worker thread (see the module's docstring).

    >>> trackers = Trackers.for_run(tc)         # none when tc.trackers is empty
    >>> trackers.start({"model": ..., "train": ...}); trackers.log(rec); trackers.finish()
    """

    def __init__(self, trackers=()):
        self.live = list(trackers)        # dropped from when they fail
        self.queue = queue.SimpleQueue()
        self.thread = None
        self.closed = False

    @classmethod
    def for_run(cls, tc) -> "Trackers":
        directory = report_dir(tc).absolute()   # the writers' threads never follow a chdir
        made = {"tensorboard": lambda: TensorBoard(directory),
                "wandb": lambda: WandB(directory, directory.name)}
        return cls(made[name]() for name in tc.trackers)

    def start(self, configs: dict) -> None:
        if not self.live:
            return
        self.queue.put(("start", (configs,)))
        self.thread = threading.Thread(target=self._work, name="anecy-trackers", daemon=True)
        self.thread.start()

    def log(self, rec) -> None:
        """Queue StepRecord ``rec``'s scalars; returns at once."""
        if self.thread is not None and not self.closed:
            self.queue.put(("log", (rec.step, rec.scalars())))

    def close(self) -> None:
        """Queue the trackers' finish; returns at once (they finish while the run saves)."""
        if self.thread is not None and not self.closed:
            self.closed = True
            self.queue.put(("finish", ()))

    def finish(self, timeout: float = None) -> None:
        """Close, and wait at most ``timeout`` (default FINISH_TIMEOUT_S) seconds for the
        trackers to finish; one still writing then is left to it, with a warning."""
        self.close()
        if self.thread is None:
            return
        timeout = FINISH_TIMEOUT_S if timeout is None else timeout
        self.thread.join(timeout)
        if self.thread.is_alive():
            for tracker in list(self.live):
                warn(f"{tracker.name} still writing after {timeout:g} s at the end "
                     f"of the run; left unfinished")
        self.thread = None

    def _work(self):
        while True:
            method, args = self.queue.get()
            for tracker in list(self.live):
                try:
                    getattr(tracker, method)(*args)
                except BaseException as e:   # whatever a tracker does, the run goes on
                    self.live.remove(tracker)
                    _failed(tracker, method, e)
            if method == "finish":
                return
