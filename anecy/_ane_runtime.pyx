# cython: language_level=3
"""The Apple Neural Engine's runtime objects, over the C interface of anecy/objc
(ane_shim.h on macOS; elsewhere ane_platform.h's fallbacks, which never succeed):
Surface (an IOSurface, or an aligned host buffer), AneKernel (a compiled MIL program),
AneRequest (a kernel bound to an input and an output Surface), ane_available() and
compile_count()."""

from libc.stdlib cimport calloc, free

# Every call into the shim copies what it needs from its arguments, reports failures as
# text in an error buffer and never raises, so each is made without the GIL. Lifetimes:
# an AneRequest holds its AneKernel and both Surfaces (Python references), and frees its
# shim request in __dealloc__ before they are released; the shim reference-counts as well
# (ane_shim.h: a request keeps its kernel and surfaces alive), so any order is safe.

import numpy as np

from .errors import BackendUnavailable

from cpython.buffer cimport PyBUF_FORMAT
from libc.stdio cimport snprintf
from libc.string cimport memset

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void** memptr, size_t alignment, size_t size)

cdef char* _BYTE_FORMAT = b"B"   # buffer-protocol format of a Surface: unsigned bytes

# Alignment of host buffers: a page, so any vector load and any cache line is aligned.
HOST_ALIGNMENT = 4096
cdef size_t _HOST_ALIGNMENT = 4096

# True when this build has the real shim (macOS); ane_available() says whether it works.
SHIM_COMPILED = bool(ANECY_ANE_SHIM)


class AneError(BackendUnavailable):
    """The Apple Neural Engine (or its shim) could not do what was asked: unavailable on
    this machine, a program it would not compile, a failed evaluation. A user-facing error
    (one line, exit status 2), and a RuntimeError."""


cdef str _text(const char* err):
    return (<bytes>err).decode("utf-8", "replace")


def ane_available():
    """(True, "") when this process can use the Apple Neural Engine, else (False, why)."""
    cdef char why[ANE_ERR_LEN]
    cdef int ok
    why[0] = 0
    with nogil:
        ok = anecy_ane_platform_available(why, ANE_ERR_LEN)
    return (True, "") if ok else (False, _text(why) or "the Apple Neural Engine is unavailable")


def compile_count():
    """Programs handed to the ANE compiler in this process so far (failed ones too). The
    ANE leaks resources after about 119 compiles per process: anecy compiles each of its
    ten programs once per model shape (see anecy._packed.AneKernels)."""
    return anecy_ane_compile_count()


cdef int surface_lock(SurfaceMem* m) noexcept nogil:
    cdef void* p
    if m.refuse_lock:
        return -1
    if m.depth == 0 and m.handle != NULL:
        p = anecy_ane_surface_lock(m.handle)
        if p == NULL:
            return -1
        if <char*>p != m.base:      # views and plans point at base: never hand out another
            anecy_ane_surface_unlock(m.handle)
            return -1
    m.depth += 1
    return 0


cdef void surface_unlock(SurfaceMem* m) noexcept nogil:
    if m.depth == 0:
        return
    m.depth -= 1
    if m.depth == 0 and m.handle != NULL:
        anecy_ane_surface_unlock(m.handle)


cdef class Surface:
    """``Surface(nbytes, host=False)``: ``nbytes`` bytes of zeroed memory that a kernel
    reads or writes.

    On macOS an IOSurface made by the shim (width = nbytes, height 1: the layout the ANE
    reads an fp16 ``[1, C, 1, W]`` tensor from); elsewhere, or with ``host=True``, a host
    buffer aligned to ``HOST_ALIGNMENT`` bytes. ``array(dtype, shape)`` is a numpy view of
    the memory (no copy; it keeps the Surface alive). CPU access to an IOSurface belongs
    between ``lock()`` and ``unlock()`` (or inside ``with surface:``), and the ANE must not
    run a request on a locked surface; on a host buffer both only count (so unbalanced
    use shows up on every platform)."""

    def __cinit__(self, size_t nbytes, bint host=False):
        cdef char err[ANE_ERR_LEN]
        cdef void* p = NULL
        if nbytes == 0:
            raise ValueError("a Surface needs at least one byte")
        self.view_stride = 1
        self.view_len = <Py_ssize_t>nbytes
        if ANECY_ANE_SHIM and not host:
            err[0] = 0
            with nogil:
                self.mem.handle = anecy_ane_surface_create(nbytes, err, ANE_ERR_LEN)
            if self.mem.handle == NULL:
                raise AneError(f"could not create an IOSurface of {nbytes} bytes: {_text(err)}")
            self.mem.nbytes = nbytes
            # The mapping is fixed for the surface's life; surface_lock() checks that it stays.
            p = anecy_ane_surface_lock(self.mem.handle)
            if p == NULL:
                raise AneError(f"could not lock a new IOSurface of {nbytes} bytes")
            self.mem.base = <char*>p
            memset(p, 0, nbytes)
            anecy_ane_surface_unlock(self.mem.handle)
        else:
            if posix_memalign(&p, _HOST_ALIGNMENT, nbytes) != 0 or p == NULL:
                raise MemoryError(f"could not allocate a host Surface of {nbytes} bytes")
            memset(p, 0, nbytes)
            self.mem.base = <char*>p
            self.mem.nbytes = nbytes

    def __dealloc__(self):
        # No view can outlive this object (each holds a reference), so the memory is free.
        if self.mem.handle != NULL:
            if self.mem.depth > 0:
                anecy_ane_surface_unlock(self.mem.handle)
            anecy_ane_surface_free(self.mem.handle)   # requests using it keep it alive
            self.mem.handle = NULL
        elif self.mem.base != NULL:
            free(self.mem.base)
        self.mem.base = NULL

    @property
    def nbytes(self):
        return self.mem.nbytes

    def lock(self):
        """Begin CPU access (nests with further lock() calls)."""
        if surface_lock(&self.mem) != 0:
            raise AneError("could not lock the IOSurface for CPU access at the address its "
                           "views use")

    def unlock(self):
        """End the CPU access of the matching lock()."""
        if self.mem.depth == 0:
            raise RuntimeError("Surface.unlock() without a matching lock()")
        surface_unlock(&self.mem)

    def __enter__(self):
        self.lock()
        return self

    def __exit__(self, *exc):
        self.unlock()
        return False

    @property
    def locked(self):
        """Current lock depth (0: unlocked)."""
        return self.mem.depth

    @property
    def is_iosurface(self):
        """True for an IOSurface (macOS), False for a host buffer."""
        return self.mem.handle != NULL

    @property
    def address(self):
        """The address of the first byte (stable for the Surface's life)."""
        return <size_t>self.mem.base

    def __getbuffer__(self, Py_buffer* buf, int flags):
        buf.buf = self.mem.base
        buf.obj = self
        buf.len = self.view_len
        buf.readonly = 0
        buf.itemsize = 1
        if flags & PyBUF_FORMAT:
            buf.format = _BYTE_FORMAT
        else:
            buf.format = NULL
        buf.ndim = 1
        buf.shape = &self.view_len
        buf.strides = &self.view_stride
        buf.suboffsets = NULL
        buf.internal = NULL
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* buf):
        self.exports -= 1

    def array(self, dtype=np.float16, shape=None, Py_ssize_t offset=0):
        """A numpy array of ``dtype`` and ``shape`` (default: as many items as fit) over the
        Surface's memory from byte ``offset``: a view, not a copy."""
        dt = np.dtype(dtype)
        if offset < 0 or <size_t>offset > self.mem.nbytes:
            raise ValueError(f"offset {offset} is outside the Surface's {self.mem.nbytes} bytes")
        if offset % dt.alignment:
            raise ValueError(f"offset {offset} is not aligned for {dt}")
        if shape is None:
            shape = ((self.mem.nbytes - offset) // dt.itemsize,)
        elif isinstance(shape, int):
            shape = (shape,)
        shape = tuple(int(n) for n in shape)
        if any(n < 0 for n in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        count = 1
        for n in shape:
            count *= n
        if offset + count * dt.itemsize > self.mem.nbytes:
            raise ValueError(f"{shape} {dt} needs {count * dt.itemsize} bytes; the Surface has "
                             f"{self.mem.nbytes - offset} from offset {offset}")
        return np.frombuffer(self, dtype=dt, count=count, offset=offset).reshape(shape)

    def __repr__(self):
        kind = "IOSurface" if self.mem.handle != NULL else "host buffer"
        return f"<Surface: {kind}, {self.mem.nbytes} bytes at {self.address:#x}>"


cdef int _shim_evaluate(void* ctx, char* err, size_t err_len) noexcept nogil:
    return anecy_ane_evaluate(<anecy_ane_request*>ctx, err, err_len)


cdef class AneKernel:
    """``AneKernel(mil_text, blobs=None, name=None)``: a MIL program compiled and loaded on
    the ANE (raises AneError with the compiler's or the platform's reason if it cannot be).

    ``blobs`` maps each ``BLOBFILE`` path of the text (``@model_path/weights/...``) to the
    file's bytes. ``bind(input, output)`` makes an AneRequest; ``evaluate(request)`` runs
    one (``evaluate_c`` is the same without the GIL, for Cython callers). Every compile
    counts towards the ANE's limit of about 119 per process: compile once, bind many.

    The compile happens in ``__init__``, so a subclass (a stand-in for the ANE in tests
    and benchmarks) can replace it, together with ``bind`` and ``evaluator``."""

    def __init__(self, mil_text, blobs=None, name=None):
        cdef char err[ANE_ERR_LEN]
        cdef anecy_ane_blob* table = NULL
        cdef const char* text
        cdef int n, i
        if self.handle != NULL:
            raise RuntimeError(f"{self.name} is already compiled")
        self.name = str(name) if name is not None else "MIL program"
        data = mil_text.encode("utf-8") if isinstance(mil_text, str) else bytes(mil_text)
        if not data or b"\0" in data:
            raise ValueError(f"{self.name}: the MIL text must be non-empty and hold no NUL")
        items = []
        for path, blob in (blobs or {}).items():
            p = path.encode("utf-8") if isinstance(path, str) else bytes(path)
            if b"\0" in p:
                raise ValueError(f"{self.name}: blob path {path!r} holds a NUL")
            items.append((p, bytes(blob)))
        n = len(items)
        table = <anecy_ane_blob*>calloc(n if n > 0 else 1, sizeof(anecy_ane_blob))
        if table == NULL:
            raise MemoryError()
        for i in range(n):            # items keeps every bytes object alive past the call
            table[i].path = <const char*>items[i][0]
            table[i].data = <const void*><const char*>items[i][1]
            table[i].length = len(items[i][1])
        text = data
        err[0] = 0
        with nogil:
            self.handle = anecy_ane_compile(text, table, n, err, ANE_ERR_LEN)
        free(table)
        if self.handle == NULL:
            raise AneError(f"compiling {self.name} for the ANE failed: {_text(err)}")

    def __dealloc__(self):
        # the model stays loaded until the requests that use it are gone too (shim refcount)
        anecy_ane_kernel_free(self.handle)
        self.handle = NULL

    def bind(self, Surface input not None, Surface output not None):
        """An AneRequest that runs this program from ``input`` into ``output`` (IOSurfaces
        of at least the program's input and output bytes)."""
        cdef char err[ANE_ERR_LEN]
        cdef anecy_ane_request* h
        cdef AneRequest req
        if self.handle == NULL:
            raise AneError(f"{self.name}: not compiled (AneKernel.__init__ did not run)")
        if input.mem.handle == NULL or output.mem.handle == NULL:
            raise AneError(f"{self.name}: an ANE request needs IOSurface-backed Surfaces, "
                           f"not host buffers")
        err[0] = 0
        with nogil:
            h = anecy_ane_request_create(self.handle, input.mem.handle, output.mem.handle, err,
                                         ANE_ERR_LEN)
        if h == NULL:
            raise AneError(f"{self.name}: could not create an ANE request: {_text(err)}")
        req = AneRequest.__new__(AneRequest)
        req.handle = h
        req.kernel_handle = self.handle
        req.kernel = self
        req.input = input
        req.output = output
        return req

    cdef int evaluate_c(self, AneRequest request, char* err, size_t err_len) noexcept nogil:
        if request.handle == NULL or request.kernel_handle != self.handle:
            if err != NULL and err_len > 0:
                snprintf(err, err_len, "%s", b"the request was not made by this kernel's bind()")
            return -1
        return anecy_ane_evaluate(request.handle, err, err_len)

    cdef Evaluator evaluator(self, AneRequest request) except *:
        cdef Evaluator ev
        if request is None or request.handle == NULL or request.kernel_handle != self.handle:
            raise AneError(f"{self.name}: the request was not made by this kernel's bind()")
        ev.fn = _shim_evaluate
        ev.ctx = request.handle
        return ev

    def evaluate(self, AneRequest request not None):
        """Run ``request`` on the ANE and wait for it (the GIL is released meanwhile). Its
        Surfaces must not be locked or written while it runs."""
        cdef char err[ANE_ERR_LEN]
        cdef int rc
        err[0] = 0
        with nogil:
            rc = self.evaluate_c(request, err, ANE_ERR_LEN)
        if rc != 0:
            raise AneError(f"{self.name}: ANE evaluation failed: {_text(err)}")

    def __repr__(self):
        return f"<AneKernel {self.name}>"


cdef class AneRequest:
    """A compiled program bound to its input and output Surface (made by AneKernel.bind)."""

    def __dealloc__(self):
        # runs before the kernel and surface references are dropped: request first
        anecy_ane_request_free(self.handle)
        self.handle = NULL

    def __repr__(self):
        name = self.kernel.name if self.kernel is not None else "?"
        return f"<AneRequest {name}>"
