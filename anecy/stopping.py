"""Stopping a run cleanly: Ctrl-C or SIGTERM asks the training loop to finish the current
microstep, save and return. A second request stops at once, except during the final save,
which is finished first (it holds the run's last good state)."""

import signal
from contextlib import contextmanager


class StopRequests:
    """The run's stop requests; the object itself is the signal handler."""

    def __init__(self):
        self.requested = False
        self.saving = False          # the final save is running: requests wait for it
        self.during_save = False     # a request came while it ran

    def __call__(self, *_):
        if self.saving:
            self.during_save = True
            return
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    @contextmanager
    def on_signals(self):
        """SIGINT and SIGTERM request a stop while the block runs (in the main thread; other
        threads cannot handle signals and run without)."""
        old_handlers = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, self)
            except ValueError:  # not the main thread: no signal handling
                pass
        try:
            yield
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)

    @contextmanager
    def final_save(self):
        """The final save: finished even if another Ctrl-C or SIGTERM comes while it runs."""
        self.saving = True
        try:
            yield
        finally:
            self.saving = False
