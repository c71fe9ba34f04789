"""Data parallelism over MPI: one model trained by N processes (ranks), on one machine or on
several, launched by ``mpirun -n N`` (``--hostfile`` for several machines).

The launch is read from the MPI launcher's environment (Open MPI's or MPICH's); a process
started without one is a single process and never imports mpi4py, so anecy runs as before
where no MPI is installed.

The split: the run's windows are numbered 0, 1, 2, ... in the one order the seed gives (as a
single process draws them). An update takes the next ``N * accum`` of them; in each microstep
every rank computes one, rank r the window ``step_count + r``, so the windows done are always a
prefix of that order, whatever N: N ranks with ``--accum k`` see what one process sees with
``--accum N*k``, and a checkpoint resumes on another N. Each rank draws (and drops) the other
ranks' windows from the token sampler too, so every rank holds the single process's sampler
state.

Gradients: before each update the flat gradient buffer (the adapters' alone in a LoRA run) is
summed over the ranks in place, in buckets of ``BUCKET_BYTES`` all in flight at once
(``Iallreduce``). They are not overlapped with the backward: the backward is one compiled call
per microstep with no point where Python could start a bucket, and with ``--accum k`` only the
last of the k microsteps could overlap at all.

Faults: every collective is non-blocking and waited for with a deadline (MPI's blocking calls
never time out). Before each one a rank tells the others it has arrived (a small message on its
own communicator), and repeats it while it waits, so a rank that waits past the deadline can
name the ranks that never came, or that came and went silent:
it prints one line (the lowest rank still running does) and ends its process with a non-zero
status, which makes the launcher end the others. A rank that dies is noticed by the launcher
itself (Open MPI's mpirun ends the job and names it); one that hangs by the deadline. Rank 0
writes every file, each atomically, so the last checkpoint is intact either way."""

import os
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from .config import MPI_TIMEOUT
from .errors import AnecyError, ConfigError

BUCKET_BYTES = 32 << 20        # gradient bytes per all-reduce call (mlx-lm's and DDP's ~32 MB)
SAVE_ALLOWANCE = 10            # a rank announced as saving a checkpoint gets this many timeouts
SIGNAL_GRACE = 0.5             # seconds a collective may still take once a stop signal came
HEARTBEAT = 0.1                # seconds between the notices of a rank waiting at a collective
EXIT_LOST_RANK = 3             # the status of a rank that stops because another was lost
EXIT_REFUSED = 2               # ranks that disagree at start: a usage error

# the launchers' variables holding the number of processes: Open MPI's, MPICH's (Hydra) and
# Intel MPI's
_SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launched_size() -> int:
    """The number of processes the MPI launcher started (1 without one)."""
    for var in _SIZE_VARS:
        try:
            return max(1, int(os.environ[var]))
        except (KeyError, ValueError):
            pass
    return 1


class Refused(AnecyError):
    """The ranks disagree at start (code, settings, data or weights). Raised on every rank;
    only rank 0's message is printed (``quiet`` on the others)."""

    def __init__(self, message, quiet):
        super().__init__(message)
        self.quiet = quiet


def checksum(*arrays) -> int:
    """CRC-32 of the arrays' bytes, a chunk at a time (no copy of a contiguous array)."""
    crc = 0
    for a in arrays:
        raw = memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
        for i in range(0, len(raw), 1 << 24):
            crc = zlib.crc32(raw[i:i + (1 << 24)], crc)
    return crc


def text_checksum(text: str) -> int:
    return zlib.crc32(text.encode())


def code_fingerprint() -> int:
    """A checksum of anecy's own source (its .py, .pyx, .pxd and .h files): ranks running
    other code would compute other things."""
    root = Path(__file__).resolve().parent
    crc = 0
    for pattern in ("*.py", "commands/*.py", "*.pyx", "*.pxd", "*.h"):
        for p in sorted(root.glob(pattern)):
            crc = zlib.crc32(p.relative_to(root).as_posix().encode(), crc)
            crc = zlib.crc32(p.read_bytes(), crc)
    return crc


class Group:
    """The N ranks of one run: their collectives, each waited for with a deadline.

    ``rank``, ``size``: this process's place; ``timeout``: the deadline in seconds; ``seq``:
    the collectives done (the same on every rank); ``seen[p]``: the last arrival notice of
    rank p, ``2*seq`` (arrived at collective seq) or ``2*seq + 1`` (on its way to it, saving a
    checkpoint first); ``heard_at[p]``: when it came. ``stop`` (a StopRequests, set by the
    trainer) is polled while waiting; ``joined``: the start-up check passed; ``last_good``
    (set by the trainer: a function giving the (path, step) of the last good checkpoint, or
    None) is what a lost rank's message names.
    ``reduce_ms``/``reduce_bytes``/``reduces``: the gradient all-reduces' time and volume."""

    def __init__(self, comm, timeout: float = MPI_TIMEOUT, prog: str = "anecy"):
        from mpi4py import MPI
        self.MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.timeout, self.prog = float(timeout), prog
        self.notices = comm.Dup()        # arrival notices travel apart from the collectives
        self.seq = 0
        self.seen = np.zeros(self.size, np.int64)
        self.heard_at = np.full(self.size, time.monotonic())
        self._inbox = np.zeros(self.size, np.int64)
        self._receiving = [None] * self.size
        self._sending = []
        for p in self._peers():
            self._post_receive(p)
        self.stats = np.zeros(8, np.float64)    # one microstep's figures, summed over ranks
        self.stop = None
        self.last_good = None
        self.joined = False            # the start-up check passed: errors are the same on all
        self.reduce_ms = 0.0
        self.reduce_bytes = 0
        self.reduces = 0

    @classmethod
    def from_environment(cls, timeout: float = MPI_TIMEOUT, prog: str = "anecy"):
        """The Group of an MPI launch of several processes, else None (a single process)."""
        n = launched_size()
        if n <= 1:
            return None
        try:
            import mpi4py
            mpi4py.rc.thread_level = "funneled"   # only the main thread calls MPI
            from mpi4py import MPI
        except ImportError:
            raise ConfigError(f"started by an MPI launcher as {n} processes, but mpi4py is not "
                              "installed: pip install 'anecy[mpi]'") from None
        except RuntimeError as e:                # mpi4py present, no MPI library to load
            raise ConfigError(f"started by an MPI launcher as {n} processes, but mpi4py "
                              f"cannot load the MPI library: {e}") from None
        comm = MPI.COMM_WORLD
        comm.Set_errhandler(MPI.ERRORS_RETURN)
        if timeout <= 0:
            raise ConfigError(f"the ranks' timeout must be positive, got {timeout:g} s")
        return cls(comm, timeout, prog)

    def _peers(self):
        return (p for p in range(self.size) if p != self.rank)

    # -- arrival notices -------------------------------------------------------------------------
    def _post_receive(self, p):
        self._receiving[p] = self.notices.Irecv(self._inbox[p:p + 1], source=p, tag=0)

    def _read_notices(self):
        for p in self._peers():
            while self._receiving[p].Test():
                self.seen[p] = max(self.seen[p], self._inbox[p])
                self.heard_at[p] = time.monotonic()
                self._post_receive(p)
        self._sending = [(r, buf) for r, buf in self._sending if not r.Test()]

    def _announce(self, value: int):
        out = np.array([value], np.int64)        # kept (with its request) until sent
        for p in self._peers():
            self._sending.append((self.notices.Isend(out, dest=p, tag=0), out))

    def saving(self):
        """Tell the others this rank writes a checkpoint before its next collective: they
        wait ``SAVE_ALLOWANCE`` timeouts for it."""
        self._announce(2 * (self.seq + 1) + 1)

    def _missing(self, seq, now, start, silence=None):
        """The ranks lost at collective ``seq``: those that have not arrived within their
        allowance (the timeout, or SAVE_ALLOWANCE of them for a rank saving a checkpoint),
        and those that arrived but went silent for as long (a rank waiting at a collective
        repeats its notice every HEARTBEAT s, so one that stops has died or hangs inside
        it). ``silence``: one allowance for all instead."""
        late = []
        for p in self._peers():
            arrived = self.seen[p] >= 2 * seq and self.seen[p] != 2 * seq + 1
            allowance = silence or self.timeout * (SAVE_ALLOWANCE
                                                   if self.seen[p] == 2 * seq + 1 else 1)
            quiet = now - (self.heard_at[p] if arrived else max(start, self.heard_at[p]))
            if quiet > allowance:
                late.append(p)
        return late

    # -- waiting ---------------------------------------------------------------------------------
    def _wait(self, requests, what: str):
        """Wait for ``requests`` (the collective ``what``); past the deadline, or soon after
        a stop signal while others do not come, end this process with one line."""
        MPI = self.MPI
        self.seq += 1
        seq = self.seq
        self._announce(2 * seq)
        start = announced = time.monotonic()
        signalled = None
        polls = 0
        while True:
            try:
                if MPI.Request.Testall(requests):
                    return
            except MPI.Exception as e:
                self._lost(what, self._missing(seq, float("inf"), start), f" ({e})")
            polls += 1
            if polls < 200:
                continue                          # the first ~ms: poll at full speed
            self._read_notices()
            now = time.monotonic()
            if now - announced > HEARTBEAT:
                self._announce(2 * seq)           # still here
                announced = now
            late = self._missing(seq, now, start)
            if late:
                self._lost(what, late, f" within {self.timeout:g} s (died or hung)")
            if self.stop is not None and self.stop.requested:
                signalled = signalled or now
                if now - signalled > SIGNAL_GRACE:
                    # the launcher ends the run (a rank died), or the user stops it: name
                    # the ranks silent for a few heartbeats
                    self._lost(what, self._missing(seq, now, start, 3 * HEARTBEAT),
                               " (died or hung: a stop signal came while waiting for it, "
                               "the launcher is ending the run)", signalled=True)
            time.sleep(0.0002 if polls < 2000 else 0.002)

    def _lost(self, what, late, why, signalled=False):
        """Stop this process: one line from the lowest rank still running, naming the ranks
        lost, then a non-zero exit (the launcher ends the other ranks). Once the launcher
        ends the run (``signalled``), rank 0 alone speaks: a rank it stops (even one that was
        hung: the launcher wakes it to end it) then finds the others gone too."""
        alive = [p for p in range(self.size) if p not in late]
        if alive and self.rank == alive[0] and (self.rank == 0 or not signalled):
            if late:
                who = f"rank{'s' if len(late) > 1 else ''} {', '.join(map(str, late))} of " \
                      f"{self.size}"
            else:
                who = "the other ranks"
            where = ""
            last_good = self.last_good() if self.last_good is not None else None
            if last_good is not None:
                path, step = last_good
                where = f"; the last checkpoint, {path} (step {step}), is intact: --resume it"
            print(f"{self.prog}: error: {who} did not complete {what}{why}; stopping{where}",
                  file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(EXIT_LOST_RANK)

    # -- the collectives -------------------------------------------------------------------------
    def check_same(self, fields: dict):
        """Refuse to start unless every rank has the same value of each field (ints:
        checksums). ``fields`` maps what the value is of (e.g. "data") to it."""
        names = list(fields)
        mine = np.array([int(fields[n]) & 0x7FFFFFFFFFFFFFFF for n in names], np.int64)
        every = np.zeros((self.size, len(names)), np.int64)
        self._wait([self.comm.Iallgather(mine, every)], "the start-up check")
        for p in range(self.size):
            for j, name in enumerate(names):
                if every[p, j] != every[0, j]:
                    raise Refused(f"rank {p} has other {name} than rank 0: every rank "
                                  "must run the same anecy with the same flags, data and "
                                  "weights", quiet=self.rank != 0)

    def sum_stats(self, values, what: str) -> np.ndarray:
        """``values`` (a few floats: one microstep's loss, counts, stop flag) summed over
        the ranks."""
        s = self.stats
        s[:] = 0
        s[:len(values)] = values
        self._wait([self.comm.Iallreduce(self.MPI.IN_PLACE, s, op=self.MPI.SUM)], what)
        return s[:len(values)]

    def gather(self, values, what: str) -> np.ndarray:
        """[size, len(values)]: every rank's ``values`` (floats), on every rank."""
        mine = np.asarray(values, np.float64)
        every = np.zeros((self.size, mine.size), np.float64)
        self._wait([self.comm.Iallgather(mine, every)], what)
        return every

    def sum_gradients(self, grads: np.ndarray, what: str):
        """Sum the flat gradient buffer over the ranks, in place, in buckets all in flight
        at once."""
        t0 = time.perf_counter()
        per = max(1, BUCKET_BYTES // grads.itemsize)
        requests = [self.comm.Iallreduce(self.MPI.IN_PLACE, grads[i:i + per], op=self.MPI.SUM)
                    for i in range(0, grads.size, per)]
        self._wait(requests, what)
        self.reduce_ms += (time.perf_counter() - t0) * 1e3
        self.reduce_bytes += grads.nbytes
        self.reduces += 1

    def describe(self) -> str:
        return (f"data parallel: {self.size} ranks (MPI), timeout {self.timeout:g} s")
