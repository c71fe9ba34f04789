# The background worker that runs weight-gradient (dW) sgemms while the layer loop goes on,
# and the monotonic clock the engine and the backends time themselves with.

from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

from ._timeline cimport TraceTrack


cdef inline double now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6


# C[M,N] = alpha * op(A) @ op(B) + beta * C, row-major (see _ops.sgemm);
# or, when `call` is set, call(arg) instead.
cdef struct GemmJob:
    bint trans_a
    bint trans_b
    int M
    int N
    int K
    float alpha
    const float* A
    int lda
    const float* B
    int ldb
    float beta
    float* C
    int ldc
    void (*call)(void*) noexcept nogil
    void* arg


cdef struct WorkerState


cdef class DWWorker:
    cdef WorkerState* state
    cdef readonly bint threaded      # the thread started (False only while failing to)
    # Queue a job. Blocks while the queue is full.
    cdef void submit(self, GemmJob job) noexcept nogil
    # Queue call(arg).
    cdef void submit_call(self, void (*call)(void*) noexcept nogil, void* arg) noexcept nogil
    # Record each job (its number, start, end and gradient) on `timeline` (NULL: stop);
    # call with no job pending (wait_all)
    cdef void set_timeline(self, TraceTrack* timeline) noexcept nogil
    # Count of jobs submitted so far; wait_for(t) returns once the first t are done.
    cdef long ticket(self) noexcept nogil
    cdef void wait_for(self, long ticket) noexcept nogil
    cdef void wait_all(self) noexcept nogil
