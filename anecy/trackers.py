"""The experiment trackers a run reports to besides its metrics file (``--report-to``):
TensorBoard and Weights & Biases, each optional and in its own extra.

A tracker never holds training up and never stops it. The loop hands each StepRecord's
scalars to the trackers' queues, and each tracker has a thread that feeds it from its queue,
so a tracker that is slow (a network, a full disk) costs the loop and the other trackers
nothing. A tracker that raises, at its start, a log or its finish, is one warning line on
stderr and is dropped; the others and the run go on. At the end the run waits at most
``FINISH_TIMEOUT_S`` for the trackers to finish writing.

Only the process that writes the metrics file reports to trackers (anecy trains in one)."""

import importlib
import itertools
import os
import queue
import socket
import sys
import threading
import time
from pathlib import Path

NAMES = ("tensorboard", "wandb")
# what ``--report-to NAME`` needs importable (each NAME is also the extra that installs it)
MODULES = {"tensorboard": ("tensorboard.summary.writer.record_writer",
                           "tensorboard.plugins.hparams.summary_v2"),
           "wandb": ("wandb",)}
FINISH_TIMEOUT_S = 30.0     # the longest a run waits at its end for a tracker to finish


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
            install = f'pip install "anecy[{name}]"'
            try:
                importlib.import_module(module)
            except ImportError:
                raise ConfigError(f"--report-to {name} needs the {name} package: "
                                  f"{install}") from None
            except Exception as e:   # installed but broken (a mismatched dependency)
                why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
                raise ConfigError(f"--report-to {name}: {module} fails to import ({why}); "
                                  f"reinstall it: {install}") from None


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
    """An event file in ``directory``, written with the ``tensorboard`` package's own record
    writer and protos (no TensorFlow, no PyTorch): the configs as HParams, then the scalars
    of each step. The writes are synchronous, in the trackers' thread, so that a failure
    (a full disk) reaches that thread as an exception, and its one warning line."""
    name = "tensorboard"
    files = itertools.count()           # this process's event files, numbered

    def __init__(self, directory):
        self.directory = Path(directory)
        self.writer = None

    def start(self, configs: dict):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.plugins.hparams.summary_v2 import hparams_pb
        from tensorboard.summary.writer.record_writer import RecordWriter
        self.directory.mkdir(parents=True, exist_ok=True)
        # the name TensorBoard's own writers give event files (TensorBoard reads "tfevents")
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
                f"{os.getpid()}.{next(self.files)}")
        self.writer = RecordWriter(open(self.directory / name, "xb"))
        self._write(Event(wall_time=time.time(), file_version="brain.Event:2"))
        self._write(Event(wall_time=time.time(), step=0,
                          summary=hparams_pb(hyperparameters(configs))))

    def log(self, step: int, scalars: dict):
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        self._write(Event(wall_time=time.time(), step=step, summary=Summary(
            value=[Summary.Value(tag=tag, simple_value=v) for tag, v in scalars.items()])))

    def _write(self, event):
        self.writer.write(event.SerializeToString())
        self.writer.flush()

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


class Feed:
    """One tracker and the thread that calls it, in order, with what its queue holds; a
    tracker that raises is reported once, released as far as it lets itself be, and called
    no more."""

    def __init__(self, tracker):
        self.tracker = tracker
        self.queue = queue.SimpleQueue()
        self.failed = False
        self.thread = threading.Thread(target=self._work, name=f"anecy-{tracker.name}",
                                       daemon=True)

    def _work(self):
        while True:
            method, args = self.queue.get()
            if not self.failed:
                try:
                    getattr(self.tracker, method)(*args)
                except BaseException as e:   # whatever a tracker does, the run goes on
                    self.failed = True
                    _failed(self.tracker, method, e)
                    if method != "finish":
                        try:                 # its files closed if it can; said once above
                            self.tracker.finish()
                        except BaseException:
                            pass
            if method == "finish":
                return


class Trackers:
    """The trackers of one run, each fed by its own thread (see the module's docstring), so
    that one slow tracker holds up neither the run nor the others.

    >>> trackers = Trackers.for_run(tc)         # none when tc.trackers is empty
    >>> trackers.start({"model": ..., "train": ...}); trackers.log(rec); trackers.finish()
    """

    def __init__(self, trackers=()):
        self.feeds = [Feed(t) for t in trackers]
        self.started = self.closed = False

    @classmethod
    def for_run(cls, tc) -> "Trackers":
        directory = report_dir(tc).absolute()   # the writers' threads never follow a chdir
        made = {"tensorboard": lambda: TensorBoard(directory),
                "wandb": lambda: WandB(directory, directory.name)}
        return cls(made[name]() for name in tc.trackers)

    def start(self, configs: dict) -> None:
        for feed in self.feeds:
            feed.queue.put(("start", (configs,)))
            feed.thread.start()
        self.started = True

    def log(self, rec) -> None:
        """Queue StepRecord ``rec``'s scalars for each tracker; returns at once."""
        if self.started and not self.closed:
            scalars = rec.scalars()
            for feed in self.feeds:
                if not feed.failed:
                    feed.queue.put(("log", (rec.step, scalars)))

    def close(self) -> None:
        """Queue the trackers' finish; returns at once (they finish while the run saves)."""
        if self.started and not self.closed:
            self.closed = True
            for feed in self.feeds:
                feed.queue.put(("finish", ()))

    def finish(self, timeout: float = None) -> None:
        """Close, and wait at most ``timeout`` (default FINISH_TIMEOUT_S) seconds in all for
        the trackers to finish; one still writing then is left to it, with a warning."""
        self.close()
        if not self.started:
            return
        timeout = FINISH_TIMEOUT_S if timeout is None else timeout
        deadline = time.monotonic() + timeout
        for feed in self.feeds:
            feed.thread.join(max(0.0, deadline - time.monotonic()))
            if feed.thread.is_alive() and not feed.failed:
                warn(f"{feed.tracker.name} still writing after {timeout:g} s at the end of "
                     f"the run; left unfinished")
        self.feeds = []       # waited for once
