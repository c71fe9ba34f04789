# The Apple Neural Engine: surfaces, compiled kernels, requests.
# The C interface of anecy/objc/ane_shim.h; on platforms other than macOS, ane_platform.h
# defines the same functions as fallbacks that never succeed (see that header).

cdef extern from "ane_platform.h" nogil:
    ctypedef struct anecy_ane_kernel:
        pass
    ctypedef struct anecy_ane_surface:
        pass
    ctypedef struct anecy_ane_request:
        pass
    ctypedef struct anecy_ane_blob:
        const char* path
        const void* data
        size_t length
    enum:
        ANECY_ANE_SHIM          # 1 when the real shim is compiled in (macOS), else 0
    int anecy_ane_platform_available(char* why, size_t why_len)
    int anecy_ane_available(char* why, size_t why_len)
    anecy_ane_kernel* anecy_ane_compile(const char* mil_text, const anecy_ane_blob* blobs,
                                        int n_blobs, char* err, size_t err_len)
    void anecy_ane_kernel_free(anecy_ane_kernel* kernel)
    int anecy_ane_compile_count()
    anecy_ane_surface* anecy_ane_surface_create(size_t nbytes, char* err, size_t err_len)
    void* anecy_ane_surface_lock(anecy_ane_surface* surface)
    void anecy_ane_surface_unlock(anecy_ane_surface* surface)
    size_t anecy_ane_surface_bytes(const anecy_ane_surface* surface)
    void anecy_ane_surface_free(anecy_ane_surface* surface)
    anecy_ane_request* anecy_ane_request_create(anecy_ane_kernel* kernel, anecy_ane_surface* inp,
                                                anecy_ane_surface* out, char* err,
                                                size_t err_len)
    int anecy_ane_evaluate(anecy_ane_request* request, char* err, size_t err_len)
    void anecy_ane_request_free(anecy_ane_request* request)


# Size of the error buffers passed to the shim.
cdef enum:
    ANE_ERR_LEN = 1024


# A Surface's memory as plain C, so that kernel calls lock, fill and unlock it without the
# GIL (a pointer to it stays valid for the life of its Surface).
cdef struct SurfaceMem:
    anecy_ane_surface* handle          # NULL for a host buffer
    char* base                         # the memory (host buffer: owned; IOSurface: mapped)
    size_t nbytes
    int depth                          # lock depth
    bint refuse_lock                   # testing: every lock fails (exercises error paths)


# Lock for CPU access (nests); 0, or -1 if the IOSurface could not be locked where it was
# mapped (or refuse_lock is set). Must be balanced by surface_unlock().
cdef int surface_lock(SurfaceMem* m) noexcept nogil
cdef void surface_unlock(SurfaceMem* m) noexcept nogil


cdef class Surface:
    """Memory a kernel reads or writes: an IOSurface on macOS, an aligned host buffer
    elsewhere (or when asked for one)."""
    cdef SurfaceMem mem
    cdef int exports                   # live buffer-protocol views
    cdef Py_ssize_t view_len           # nbytes, as the buffer protocol wants it
    cdef Py_ssize_t view_stride        # 1
    cdef object __weakref__


# How a kernel call runs one program, in C: fn(ctx, err, err_len) runs it and waits; 0, or
# -1 with the NUL-terminated reason in err. ctx is borrowed: whoever holds the Evaluator
# keeps the objects behind it alive.
ctypedef int (*evaluate_fn)(void* ctx, char* err, size_t err_len) noexcept nogil

cdef struct Evaluator:
    evaluate_fn fn
    void* ctx


cdef class AneRequest


cdef class AneKernel:
    """A compiled and loaded MIL program."""
    cdef anecy_ane_kernel* handle
    cdef readonly str name
    # Runs `request` (one of this kernel's, not None) and waits; 0, or -1 with the
    # NUL-terminated reason in err. Needs no GIL.
    cdef int evaluate_c(self, AneRequest request, char* err, size_t err_len) noexcept nogil
    # The C form of evaluate(request), for callers without the GIL (checked here, once).
    cdef Evaluator evaluator(self, AneRequest request) except *


cdef class AneRequest:
    """An AneKernel bound to one input and one output Surface."""
    cdef anecy_ane_request* handle
    cdef anecy_ane_kernel* kernel_handle
    cdef readonly AneKernel kernel
    cdef readonly Surface input
    cdef readonly Surface output
