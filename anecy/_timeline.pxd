# The timeline of training steps (anecy.timeline writes it as a Chrome trace): preallocated
# event buffers, one per thread, filled without the GIL by the engine, the packed backends
# and the dW worker, with times from now_ms (the clock the engine's timers read).

# What an event is. Its name and category are in _timeline.pyx's EVENTS, one row per id.
cdef enum:
    EV_SECTION = 0        # + an engine timer slot (T_KERNELS..T_DW): a section charge() timed
    EV_SDPA_FWD = 6       # the ten kernel calls, in kernel_layout.KERNEL_NAMES order
    EV_WO_FWD = 7
    EV_FFN_FUSED = 8
    EV_FFN_BWD_W2T = 9
    EV_FFN_BWD_W13T = 10
    EV_WOT_BWD = 11
    EV_SDPA_BWD1 = 12
    EV_SDPA_BWD2 = 13
    EV_Q_BWD = 14
    EV_KV_BWD = 15
    EV_LORA_BWD = 16      # cpu: the adapters of one input, backward inline (v, dB, dA, dx)
    EV_EMBEDDING = 17
    EV_DW_SUBMIT = 18     # a job queued on the worker (ref: its job number; addr: its gradient)
    EV_DW_INLINE = 19     # a weight-gradient sgemm run on the main thread (addr: its gradient)
    EV_WORKER_JOB = 20    # a worker job, start to completion (ref: job number; addr: gradient,
                          # 0 for a call)
    EV_PACK = 21          # packed backends: activations into the input Surface
    EV_COPY_HELD = 22     # held fp16 q, k, v copied Surface to Surface
    EV_EXECUTE = 23       # the program run
    EV_UNPACK = 24        # outputs out of the output Surface
    EV_STAGE = 25         # weight staging (after an update)
    EV_FORWARD = 26
    EV_BACKWARD = 27
    EV_MICROSTEP = 28     # recorded from Python (anecy.timeline): a microstep
    EV_OPTIMIZER = 29     # the update: gradient norm, AdamW, staging
    EV_GRAD_NORM = 30
    EV_ADAMW = 31
    EV_ALLREDUCE = 32     # the gradients' all-reduce across ranks (recorded by whoever runs it)
    EV_LOSS = 33          # counters: the value in t1
    EV_LOSS_SCALE = 34
    N_EVENTS = 35


cdef struct TraceEvent:
    double t0             # ms on now_ms's clock
    double t1             # the end (a counter's value)
    int what              # EV_*
    int layer             # -1: none
    long long ref         # a job number (links a submit to the worker's run), or 0
    size_t addr           # the gradient a dW job writes, or 0


# One thread's events: written by that thread only, so no lock; full, it counts the
# events it could not keep instead.
cdef struct TraceTrack:
    TraceEvent* events
    Py_ssize_t n
    Py_ssize_t capacity
    Py_ssize_t dropped


cdef inline void trace_event(TraceTrack* track, double t0, double t1, int what, int layer,
                             long long ref, size_t addr) noexcept nogil:
    cdef TraceEvent* e
    if track.n == track.capacity:
        track.dropped += 1
        return
    e = &track.events[track.n]
    e.t0, e.t1, e.what, e.layer, e.ref, e.addr = t0, t1, what, layer, ref, addr
    track.n += 1
