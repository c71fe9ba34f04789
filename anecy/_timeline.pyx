# cython: language_level=3
"""The event buffers of a timeline (anecy.timeline turns them into a Chrome trace).

A Timeline owns two tracks of preallocated events: the main thread's (the engine's
sections and kernel calls, the packed backends' packing, execution and unpacking, and the
events recorded from Python) and the dW worker's (each job it runs). The engine, the
kernels and the worker write to them without the GIL, each thread to its own track."""

import numpy as np

from libc.stdlib cimport calloc, free

from ._worker cimport now_ms
from .kernel_layout import KERNEL_NAMES
from .timers import ENGINE_TIMERS

# id -> (name, category) of every EV_* (_timeline.pxd). The category of a section is its
# timer's name; "io" is the packed backends' packing and unpacking, which Engine.timings()
# takes out of "kernels".
_SECTION_NAMES = {"kernels": "kernels", "rms": "RMSNorm", "classifier": "classifier",
                  "elementwise": "elementwise", "dw_wait": "wait for dW", "dw": "dW inline"}
EVENTS = ([(_SECTION_NAMES[t], t) for t in ENGINE_TIMERS]
          + [(k, "kernels") for k in KERNEL_NAMES]
          + [("LoRA backward", "dw"), ("embedding", "elementwise"),
             ("submit dW", "submit"), ("dW", "dw"), ("dW", "dw"),
             ("pack", "io"), ("copy held q, k, v", "io"), ("execute", "kernels"),
             ("unpack", "io"), ("stage weights", "optimizer"), ("forward", "step"),
             ("backward", "step"), ("microstep", "step"), ("optimizer update", "optimizer"),
             ("gradient norm", "optimizer"), ("AdamW", "optimizer"),
             ("allreduce", "allreduce"), ("loss", "counter"), ("loss scale", "counter")])
assert len(EVENTS) == N_EVENTS and len(ENGINE_TIMERS) == EV_SDPA_FWD - EV_SECTION \
    and EVENTS[EV_SDPA_FWD][0] == "sdpaFwd" and EVENTS[EV_KV_BWD][0] == "kvBwd" \
    and EVENTS[EV_LOSS_SCALE][0] == "loss scale"

# The ids Python records with (anecy.timeline)
MICROSTEP, OPTIMIZER, ALLREDUCE = EV_MICROSTEP, EV_OPTIMIZER, EV_ALLREDUCE
LOSS, LOSS_SCALE = EV_LOSS, EV_LOSS_SCALE
FORWARD, BACKWARD = EV_FORWARD, EV_BACKWARD
SECTION, KERNEL_CALLS = EV_SECTION, EV_SDPA_FWD
DW_SUBMIT, DW_INLINE, WORKER_JOB = EV_DW_SUBMIT, EV_DW_INLINE, EV_WORKER_JOB

# the columns events() returns
EVENT_DTYPE = np.dtype([("t0", np.float64), ("t1", np.float64), ("what", np.int32),
                        ("layer", np.int32), ("ref", np.int64), ("addr", np.uint64)])


def clock_ms():
    """now_ms: the clock of the engine's timers and of every event, in ms."""
    return now_ms()


cdef class Timeline:
    """Two tracks of ``capacity`` events each: "main" and "worker"."""
    cdef TraceTrack tracks[2]
    cdef readonly Py_ssize_t capacity

    def __cinit__(self, Py_ssize_t capacity):
        cdef int i
        if capacity < 1:
            raise ValueError("a timeline holds at least one event per track")
        self.capacity = capacity
        for i in range(2):
            self.tracks[i].events = <TraceEvent*>calloc(capacity, sizeof(TraceEvent))
            if self.tracks[i].events == NULL:
                raise MemoryError()
            self.tracks[i].capacity = capacity

    def __dealloc__(self):
        cdef int i
        for i in range(2):
            free(self.tracks[i].events)

    def track_addresses(self):
        """(main, worker): the addresses of the two TraceTracks, for Engine.set_timeline."""
        return <size_t>&self.tracks[0], <size_t>&self.tracks[1]

    def record(self, int what, double t0, double t1, int layer=-1, long long ref=0):
        """An event on the main track from Python: a slice [t0, t1] (clock_ms times), or a
        counter's value t1 at t0."""
        if not 0 <= what < N_EVENTS:
            raise ValueError(f"no event {what}")
        trace_event(&self.tracks[0], t0, t1, what, layer, ref, 0)

    def events(self, int track):
        """A copy of a track's events (0: main, 1: worker), as an EVENT_DTYPE array."""
        if track not in (0, 1):
            raise ValueError("track 0 (main) or 1 (worker)")
        cdef TraceTrack* t = &self.tracks[track]
        cdef Py_ssize_t i
        out = np.empty(t.n, EVENT_DTYPE)
        for i in range(t.n):
            out[i] = (t.events[i].t0, t.events[i].t1, t.events[i].what, t.events[i].layer,
                      t.events[i].ref, t.events[i].addr)
        return out

    @property
    def dropped(self):
        """Events that did not fit, per track."""
        return self.tracks[0].dropped, self.tracks[1].dropped

    def clear(self):
        cdef int i
        for i in range(2):
            self.tracks[i].n = self.tracks[i].dropped = 0
