/*
 * ane_platform.h - the ANE shim's C interface on every platform.
 *
 * On macOS this is ane_shim.h: the functions are defined in ane_shim.m, which setup.py
 * compiles (with -fobjc-arc) and links into anecy._ane_runtime on macOS only.
 *
 * Everywhere else the same declarations are met by static inline fallbacks with the same
 * signatures and the same error convention (see ane_shim.h): every one that can fail
 * reports that the Apple Neural Engine needs macOS on Apple Silicon and never succeeds,
 * and the rest are harmless no-ops. So anecy._ane_runtime (which calls these functions
 * directly, also without the GIL) builds, imports and says why the ane backend is
 * unavailable on any platform, with no #ifdef in the Cython code.
 *
 * ANECY_ANE_SHIM is 1 when the real shim is compiled in (macOS), else 0.
 * anecy_ane_platform_available() is anecy_ane_available() plus the one check the shim
 * cannot make for itself: the process must be arm64 (an Intel Mac, or an x86_64 Python
 * running under Rosetta on Apple Silicon, has no usable Neural Engine).
 */
#ifndef ANECY_ANE_PLATFORM_H
#define ANECY_ANE_PLATFORM_H

#include <stddef.h>
#include <stdio.h>

/* What this build targets, for the messages below. */
#if defined(__APPLE__)
#define ANECY_BUILD_OS "macOS"
#elif defined(__linux__)
#define ANECY_BUILD_OS "Linux"
#elif defined(_WIN32)
#define ANECY_BUILD_OS "Windows"
#elif defined(__FreeBSD__)
#define ANECY_BUILD_OS "FreeBSD"
#else
#define ANECY_BUILD_OS "an unknown OS"
#endif

#if defined(__arm64__) || defined(__aarch64__) || defined(_M_ARM64)
#define ANECY_BUILD_ARCH "arm64"
#define ANECY_BUILD_IS_ARM64 1
#elif defined(__x86_64__) || defined(_M_X64)
#define ANECY_BUILD_ARCH "x86_64"
#define ANECY_BUILD_IS_ARM64 0
#elif defined(__i386__) || defined(_M_IX86)
#define ANECY_BUILD_ARCH "x86"
#define ANECY_BUILD_IS_ARM64 0
#else
#define ANECY_BUILD_ARCH "an unknown CPU"
#define ANECY_BUILD_IS_ARM64 0
#endif

#define ANECY_ANE_NEEDS \
    "the Apple Neural Engine needs macOS on Apple Silicon (this build targets " \
    ANECY_BUILD_OS " " ANECY_BUILD_ARCH ")"

/* Writes msg to (err, err_len) as the shim does: NUL-terminated, truncated, err may be NULL. */
static inline void anecy_ane_platform_err_(char *err, size_t err_len, const char *msg) {
    if (err && err_len) snprintf(err, err_len, "%s", msg);
}

#ifdef __APPLE__

#include "ane_shim.h"
#define ANECY_ANE_SHIM 1

#else /* not macOS: fallbacks that never succeed */

#define ANECY_ANE_SHIM 0

typedef struct anecy_ane_kernel anecy_ane_kernel;
typedef struct anecy_ane_surface anecy_ane_surface;
typedef struct anecy_ane_request anecy_ane_request;

typedef struct anecy_ane_blob {
    const char *path;
    const void *data;
    size_t length;
} anecy_ane_blob;

#define ANECY_ANE_QOS 21u

static inline int anecy_ane_available(char *why, size_t why_len) {
    anecy_ane_platform_err_(why, why_len, ANECY_ANE_NEEDS);
    return 0;
}

static inline anecy_ane_kernel *anecy_ane_compile(const char *mil_text, const anecy_ane_blob *blobs,
                                                  int n_blobs, char *err, size_t err_len) {
    (void)mil_text;
    (void)blobs;
    (void)n_blobs;
    anecy_ane_platform_err_(err, err_len, ANECY_ANE_NEEDS);
    return NULL;
}

static inline void anecy_ane_kernel_free(anecy_ane_kernel *kernel) {
    (void)kernel;
}

static inline int anecy_ane_compile_count(void) {
    return 0;
}

static inline anecy_ane_surface *anecy_ane_surface_create(size_t bytes, char *err, size_t err_len) {
    (void)bytes;
    anecy_ane_platform_err_(err, err_len, ANECY_ANE_NEEDS);
    return NULL;
}

static inline void *anecy_ane_surface_lock(anecy_ane_surface *surface) {
    (void)surface;
    return NULL;
}

static inline void anecy_ane_surface_unlock(anecy_ane_surface *surface) {
    (void)surface;
}

static inline size_t anecy_ane_surface_bytes(const anecy_ane_surface *surface) {
    (void)surface;
    return 0;
}

static inline void anecy_ane_surface_free(anecy_ane_surface *surface) {
    (void)surface;
}

static inline anecy_ane_request *anecy_ane_request_create(anecy_ane_kernel *kernel, anecy_ane_surface *in,
                                                          anecy_ane_surface *out, char *err,
                                                          size_t err_len) {
    (void)kernel;
    (void)in;
    (void)out;
    anecy_ane_platform_err_(err, err_len, ANECY_ANE_NEEDS);
    return NULL;
}

static inline int anecy_ane_evaluate(anecy_ane_request *request, char *err, size_t err_len) {
    (void)request;
    anecy_ane_platform_err_(err, err_len, ANECY_ANE_NEEDS);
    return -1;
}

static inline void anecy_ane_request_free(anecy_ane_request *request) {
    (void)request;
}

#endif /* __APPLE__ */

/* 1 if the ANE can be used by this process, else 0 with the reason in why. */
static inline int anecy_ane_platform_available(char *why, size_t why_len) {
#if defined(__APPLE__) && !ANECY_BUILD_IS_ARM64
    anecy_ane_platform_err_(why, why_len,
                            "the Apple Neural Engine needs an arm64 process on Apple Silicon; this "
                            "build is macOS " ANECY_BUILD_ARCH " (an Intel Mac, or Python running "
                            "under Rosetta)");
    return 0;
#else
    return anecy_ane_available(why, why_len);
#endif
}

#endif /* ANECY_ANE_PLATFORM_H */
