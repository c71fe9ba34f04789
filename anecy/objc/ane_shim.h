/*
 * ane_shim.h - plain C interface to the Apple Neural Engine (macOS only).
 *
 * The implementation (ane_shim.m, Objective-C, compiled with -fobjc-arc) reaches the
 * private AppleNeuralEngine.framework at run time; this header uses C types only, so
 * Cython (and C or C++) code can call it directly, also without the GIL.
 *
 * Ownership
 *   - Every pointer returned by a *_create or *_compile function is owned by the caller
 *     and is released exactly once with the matching *_free function. Each *_free
 *     accepts NULL.
 *   - A request keeps what it uses alive: its kernel (the compiled model stays loaded
 *     until both the kernel and all of its requests are freed) and both of its
 *     surfaces. The three may therefore be freed in any order.
 *   - The pointer returned by anecy_ane_surface_lock() is valid until the matching
 *     anecy_ane_surface_unlock(); it points into memory owned by the surface.
 *   - Strings passed in (MIL text, blob paths) and blob bytes are copied; the caller
 *     keeps ownership and may free them as soon as the call returns.
 *
 * Errors
 *   Functions that can fail take (err, err_len): on failure they write a NUL-terminated
 *   message there (truncated to err_len - 1 bytes; err may be NULL or err_len 0 to
 *   ignore it) and return NULL or a non-zero int; on success they set err to "".
 *   Messages from the framework carry the NSError's description. No Objective-C
 *   exception escapes: every entry point catches and reports them.
 *
 * Thread safety
 *   - Every function may be called from any thread, without the GIL, and drains its own
 *     autorelease pool (threads without a run loop are fine callers).
 *   - The framework is loaded once (pthread_once); compiling a kernel and releasing the
 *     last reference to one are serialised by an internal mutex.
 *   - Evaluation takes no lock. One request must not be evaluated by two threads at once;
 *     a surface must be unlocked, and not written, while a request that uses it runs.
 *     Whether the ANE runs evaluations from several threads concurrently is not verified:
 *     anecy evaluates from one thread at a time.
 *
 * Limits (found on hardware by the public maderix/ANE project)
 *   - The ANE leaks resources after about 119 compiles in one process: compile every
 *     program once at start-up and reuse it (anecy_ane_compile_count() tells how many).
 *   - A request has exactly one input and one output surface.
 */
#ifndef ANECY_ANE_SHIM_H
#define ANECY_ANE_SHIM_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A compiled and loaded MIL program (opaque). */
typedef struct anecy_ane_kernel anecy_ane_kernel;
/* A shared-memory buffer the ANE reads or writes: width = bytes, height 1 (opaque). */
typedef struct anecy_ane_surface anecy_ane_surface;
/* A kernel bound to one input and one output surface, ready to evaluate (opaque). */
typedef struct anecy_ane_request anecy_ane_request;

/* One weight file referenced by the MIL text as BLOBFILE(path=string("<path>"), ...). */
typedef struct anecy_ane_blob {
    const char *path;   /* exactly as in the MIL, e.g. "@model_path/weights/mask.bin" */
    const void *data;   /* the whole file: 128-byte blob header followed by the payload */
    size_t length;      /* bytes at data */
} anecy_ane_blob;

/* Quality of service passed to compile, load, evaluate and unload (the reference's 21). */
#define ANECY_ANE_QOS 21u

/* 1 if the framework loads and its classes and selectors exist, else 0 with the reason in why. */
int anecy_ane_available(char *why, size_t why_len);

/* Compiles and loads mil_text with its n_blobs weight files; NULL on failure (see err). */
anecy_ane_kernel *anecy_ane_compile(const char *mil_text, const anecy_ane_blob *blobs, int n_blobs,
                                    char *err, size_t err_len);

/* Releases the caller's kernel; the model is unloaded and its temp dir removed once no request uses it. */
void anecy_ane_kernel_free(anecy_ane_kernel *kernel);

/* Number of compiles attempted in this process so far (calls into the ANE compiler, failed ones too). */
int anecy_ane_compile_count(void);

/* Creates a surface of `bytes` bytes (fp16 tensors: 2 * C * W); NULL on failure (see err). */
anecy_ane_surface *anecy_ane_surface_create(size_t bytes, char *err, size_t err_len);

/* Locks the surface for CPU access; returns its base address (NULL on failure: do not unlock then). */
void *anecy_ane_surface_lock(anecy_ane_surface *surface);

/* Ends the CPU access started by anecy_ane_surface_lock(). */
void anecy_ane_surface_unlock(anecy_ane_surface *surface);

/* The size in bytes the surface was created with (0 for NULL). */
size_t anecy_ane_surface_bytes(const anecy_ane_surface *surface);

/* Releases the caller's surface; its memory lives on while a request still uses it. */
void anecy_ane_surface_free(anecy_ane_surface *surface);

/* Binds kernel to surfaces in (its one input) and out (its one output); NULL on failure. */
anecy_ane_request *anecy_ane_request_create(anecy_ane_kernel *kernel, anecy_ane_surface *in,
                                            anecy_ane_surface *out, char *err, size_t err_len);

/* Runs the request on the ANE and waits for it; 0 on success, -1 with the NSError text in err. */
int anecy_ane_evaluate(anecy_ane_request *request, char *err, size_t err_len);

/* Releases the request and its references to its kernel and surfaces. */
void anecy_ane_request_free(anecy_ane_request *request);

#ifdef __cplusplus
}
#endif

#endif /* ANECY_ANE_SHIM_H */
