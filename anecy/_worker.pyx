# cython: language_level=3
"""The background dW worker.

Weight gradients are the one piece of backward work nothing downstream in the same
microstep reads, so they go to a second thread as sgemm jobs and overlap the next
kernels. Jobs run in submission order (FIFO), each exactly as it would run inline,
so gradients are bit-identical with the worker on or off."""

from libc.stdlib cimport calloc, free

from ._ops cimport sgemm
from ._timeline cimport TraceTrack, trace_event, EV_WORKER_JOB

cdef extern from "<pthread.h>" nogil:
    # opaque to Cython; the C compiler sees the platform's real definitions
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t* thread, void* attr, void* (*start)(void*) noexcept nogil,
                       void* arg)
    int pthread_join(pthread_t thread, void** retval)
    int pthread_mutex_init(pthread_mutex_t* m, void* attr)
    int pthread_mutex_destroy(pthread_mutex_t* m)
    int pthread_mutex_lock(pthread_mutex_t* m)
    int pthread_mutex_unlock(pthread_mutex_t* m)
    int pthread_cond_init(pthread_cond_t* c, void* attr)
    int pthread_cond_destroy(pthread_cond_t* c)
    int pthread_cond_wait(pthread_cond_t* c, pthread_mutex_t* m)
    int pthread_cond_broadcast(pthread_cond_t* c)

# Enough for every dW job of a backward pass of a 32-layer model; a fuller queue only
# makes submit() wait, it never drops a job.
cdef enum:
    QUEUE_CAPACITY = 256


cdef struct WorkerState:
    pthread_t thread
    pthread_mutex_t lock
    pthread_cond_t has_work
    pthread_cond_t progress
    GemmJob ring[QUEUE_CAPACITY]
    long submitted
    long completed
    bint stopping
    TraceTrack* timeline     # NULL, or where each job is recorded (set_timeline)


cdef inline void run_job(const GemmJob* j) noexcept nogil:
    if j.call != NULL:
        j.call(j.arg)
        return
    sgemm(j.trans_a, j.trans_b, j.M, j.N, j.K, j.alpha, j.A, j.lda, j.B, j.ldb, j.beta, j.C,
          j.ldc)


cdef void* worker_main(void* arg) noexcept nogil:
    cdef WorkerState* st = <WorkerState*>arg
    cdef GemmJob job
    cdef TraceTrack* timeline
    cdef long number
    cdef double t0 = 0.0
    while True:
        pthread_mutex_lock(&st.lock)
        while st.completed == st.submitted and not st.stopping:
            pthread_cond_wait(&st.has_work, &st.lock)
        if st.completed == st.submitted:  # stopping, and nothing left to do
            pthread_mutex_unlock(&st.lock)
            return NULL
        # the slot stays reserved until `completed` moves past it
        job = st.ring[st.completed % QUEUE_CAPACITY]
        number, timeline = st.completed, st.timeline
        pthread_mutex_unlock(&st.lock)
        if timeline != NULL:
            t0 = now_ms()
        run_job(&job)
        if timeline != NULL:
            trace_event(timeline, t0, now_ms(), EV_WORKER_JOB, -1, number,
                        <size_t>job.C if job.call == NULL else 0)
        pthread_mutex_lock(&st.lock)
        st.completed += 1
        pthread_cond_broadcast(&st.progress)
        pthread_mutex_unlock(&st.lock)


cdef class DWWorker:
    """A FIFO of jobs (sgemms, or calls) run by one background thread."""

    def __cinit__(self):
        self.state = <WorkerState*>calloc(1, sizeof(WorkerState))
        if self.state == NULL:
            raise MemoryError()
        self.threaded = False  # until a thread exists, so __dealloc__ joins nothing
        pthread_mutex_init(&self.state.lock, NULL)
        pthread_cond_init(&self.state.has_work, NULL)
        pthread_cond_init(&self.state.progress, NULL)
        if pthread_create(&self.state.thread, NULL, worker_main, self.state) != 0:
            raise RuntimeError("could not start the worker thread")
        self.threaded = True

    def __dealloc__(self):
        if self.state == NULL:
            return
        if self.threaded:
            with nogil:
                pthread_mutex_lock(&self.state.lock)
                self.state.stopping = True
                pthread_cond_broadcast(&self.state.has_work)
                pthread_mutex_unlock(&self.state.lock)
                pthread_join(self.state.thread, NULL)
        pthread_cond_destroy(&self.state.progress)
        pthread_cond_destroy(&self.state.has_work)
        pthread_mutex_destroy(&self.state.lock)
        free(self.state)
        self.state = NULL

    cdef void submit(self, GemmJob job) noexcept nogil:
        cdef WorkerState* st = self.state
        pthread_mutex_lock(&st.lock)
        while st.submitted - st.completed >= QUEUE_CAPACITY:
            pthread_cond_wait(&st.progress, &st.lock)
        st.ring[st.submitted % QUEUE_CAPACITY] = job
        st.submitted += 1
        pthread_cond_broadcast(&st.has_work)
        pthread_mutex_unlock(&st.lock)

    cdef void submit_call(self, void (*call)(void*) noexcept nogil, void* arg) noexcept nogil:
        cdef GemmJob job
        job.call = call
        job.arg = arg
        self.submit(job)

    cdef void set_timeline(self, TraceTrack* timeline) noexcept nogil:
        # after wait_all(): no job is running, so none is recording into the old track
        pthread_mutex_lock(&self.state.lock)
        self.state.timeline = timeline
        pthread_mutex_unlock(&self.state.lock)

    cdef long ticket(self) noexcept nogil:
        return self.state.submitted

    cdef void wait_for(self, long ticket) noexcept nogil:
        cdef WorkerState* st = self.state
        pthread_mutex_lock(&st.lock)
        while st.completed < ticket:
            pthread_cond_wait(&st.progress, &st.lock)
        pthread_mutex_unlock(&st.lock)

    cdef void wait_all(self) noexcept nogil:
        self.wait_for(self.state.submitted)

    @property
    def jobs_done(self):
        return self.state.completed
