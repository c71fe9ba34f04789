/*
 * ane_shim.m - the C interface of ane_shim.h over the private AppleNeuralEngine.framework.
 *
 * Build: macOS only, with -fobjc-arc, linked against Foundation, IOSurface and libobjc.
 * The private classes are looked up at run time (dlopen + NSClassFromString), and their
 * methods are called through objc_msgSend cast to the exact C signature of each selector,
 * so nothing here links against the private framework.
 *
 * Ownership under ARC. An Objective-C object cannot simply be a field of a C struct that
 * is allocated with calloc and released with free: a __strong field makes the struct
 * non-trivial (older compilers reject it outright), and calloc/free would skip the
 * retain/release ARC then owes it. Every struct below therefore holds its objects as
 * CFTypeRef fields that each own one +1 reference:
 *   store:   s->field = CFBridgingRetain(obj);        ARC hands its reference to the struct
 *   borrow:  id obj = (__bridge id)s->field;          no ownership change
 *   release: id obj = CFBridgingRelease(s->field);    ARC takes the reference back and
 *            s->field = NULL;                         releases it when obj goes out of scope
 * Objects are taken back inside a scope that ends before free(s). IOSurfaceRef is a plain
 * CF type (not managed by ARC) and is kept with CFRetain/CFRelease.
 */
#import <Foundation/Foundation.h>
#import <IOSurface/IOSurface.h>
#import <objc/message.h>
#import <objc/runtime.h>

#include <dlfcn.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ane_shim.h"

#if !__has_feature(objc_arc)
#error "ane_shim.m must be compiled with -fobjc-arc"
#endif

static const char *const kFrameworkPath =
    "/System/Library/PrivateFrameworks/AppleNeuralEngine.framework/AppleNeuralEngine";
/* The prefix the MIL uses for files next to model.mil ("@model_path/weights/x.bin"). */
static const char *const kModelPathPrefix = "@model_path/";

/* ---------------------------------------------------------------- the private API */

/* The selectors' C signatures (as the public maderix/ANE project calls them on hardware).
 * What the hardware work found (mechramc/Orion docs/ane_constraints.md #9, #11) is in the
 * types, so clang holds every call to it (tools/objc_check): the MIL text goes as NSData,
 * never NSString, and the weights and options dictionaries are never nil (an empty
 * dictionary for none): _Nonnull makes a nil argument a -Wnonnull error. */
typedef id (*DescriptorFn)(Class, SEL, NSData *_Nonnull, NSDictionary *_Nonnull, NSDictionary *);
typedef id (*ModelFn)(Class, SEL, id);
typedef id (*IdentifierFn)(id, SEL);
typedef BOOL (*QosOptionsErrorFn)(id, SEL, unsigned int, NSDictionary *_Nonnull, NSError **);
typedef BOOL (*EvaluateFn)(id, SEL, unsigned int, NSDictionary *_Nonnull, id, NSError **);
typedef BOOL (*UnloadFn)(id, SEL, unsigned int, NSError **);
typedef id (*SurfaceObjectFn)(Class, SEL, IOSurfaceRef);
typedef id (*RequestFn)(Class, SEL, NSArray *, NSArray *, NSArray *, NSArray *, id, id, NSNumber *);

/* Written once under pthread_once, read-only afterwards. */
static pthread_once_t g_load_once = PTHREAD_ONCE_INIT;
static char g_unavailable[512];          /* "" when the API is usable */
static Class g_descriptor_class;         /* _ANEInMemoryModelDescriptor */
static Class g_model_class;              /* _ANEInMemoryModel */
static Class g_request_class;            /* _ANERequest */
static Class g_surface_object_class;     /* _ANEIOSurfaceObject */

/* Guards compiles, unloads and g_dirs. */
static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
/* Temp directory path -> number of live kernels using it (same program, same identifier). */
static NSMutableDictionary<NSString *, NSNumber *> *g_dirs;
static int g_compiles;

struct anecy_ane_kernel {
    CFTypeRef model;    /* _ANEInMemoryModel, loaded; +1 */
    CFTypeRef tmp_dir;  /* NSString, NSTemporaryDirectory()/<hexStringIdentifier>; +1 */
    int refs;           /* the caller's + one per live request (atomic) */
};

struct anecy_ane_surface {
    IOSurfaceRef surface;  /* +1 */
    size_t bytes;
};

struct anecy_ane_request {
    anecy_ane_kernel *kernel;  /* counted in kernel->refs */
    IOSurfaceRef in;           /* +1 */
    IOSurfaceRef out;          /* +1 */
    CFTypeRef request;         /* _ANERequest; +1 */
};

/* ---------------------------------------------------------------- error text */

static void err_clear(char *err, size_t err_len) {
    if (err && err_len) err[0] = '\0';
}

__attribute__((format(printf, 3, 4)))
static void err_set(char *err, size_t err_len, const char *fmt, ...) {
    if (!err || !err_len) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
}

static const char *utf8_or(NSString *s, const char *fallback) {
    const char *c = s ? [s UTF8String] : NULL;
    return c ? c : fallback;
}

/* "<what> failed: <NSError description>" */
static void err_nserror(char *err, size_t err_len, const char *what, NSError *error) {
    err_set(err, err_len, "%s failed: %s", what,
            utf8_or([error description], "no NSError was returned"));
}

static void err_exception(char *err, size_t err_len, const char *what, NSException *ex) {
    err_set(err, err_len, "%s raised %s: %s", what, utf8_or([ex name], "an exception"),
            utf8_or([ex reason], "(no reason)"));
}

/* ---------------------------------------------------------------- loading */

static Class lookup_class(const char *name) {
    NSString *ns_name = [NSString stringWithUTF8String:name];
    Class cls = ns_name ? NSClassFromString(ns_name) : Nil;
    if (!cls) err_set(g_unavailable, sizeof g_unavailable, "class %s not found in %s", name, kFrameworkPath);
    return cls;
}

static BOOL require_method(Class cls, BOOL class_method, SEL sel) {
    /* A class method is an instance method of the metaclass. */
    if (class_respondsToSelector(class_method ? object_getClass(cls) : cls, sel)) return YES;
    err_set(g_unavailable, sizeof g_unavailable, "%s does not respond to %c%s", class_getName(cls),
            class_method ? '+' : '-', sel_getName(sel));
    return NO;
}

static void load_api(void) {
    @autoreleasepool {
        @try {
            /* The handle is never closed: the classes must stay loaded for the process. */
            if (!dlopen(kFrameworkPath, RTLD_NOW)) {
                const char *why = dlerror();
                err_set(g_unavailable, sizeof g_unavailable, "dlopen(%s) failed: %s", kFrameworkPath,
                        why ? why : "unknown error");
                return;
            }
            if (!(g_descriptor_class = lookup_class("_ANEInMemoryModelDescriptor")) ||
                !(g_model_class = lookup_class("_ANEInMemoryModel")) ||
                !(g_request_class = lookup_class("_ANERequest")) ||
                !(g_surface_object_class = lookup_class("_ANEIOSurfaceObject")))
                return;
            if (!require_method(g_descriptor_class, YES, @selector(modelWithMILText:weights:optionsPlist:)) ||
                !require_method(g_model_class, YES, @selector(inMemoryModelWithDescriptor:)) ||
                !require_method(g_model_class, NO, @selector(hexStringIdentifier)) ||
                !require_method(g_model_class, NO, @selector(compileWithQoS:options:error:)) ||
                !require_method(g_model_class, NO, @selector(loadWithQoS:options:error:)) ||
                !require_method(g_model_class, NO, @selector(evaluateWithQoS:options:request:error:)) ||
                !require_method(g_model_class, NO, @selector(unloadWithQoS:error:)) ||
                !require_method(g_request_class, YES,
                                @selector(requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:
                                          perfStats:procedureIndex:)) ||
                !require_method(g_surface_object_class, YES, @selector(objectWithIOSurface:)))
                return;
        } @catch (NSException *ex) {
            err_exception(g_unavailable, sizeof g_unavailable, "loading AppleNeuralEngine", ex);
        } @catch (...) {
            err_set(g_unavailable, sizeof g_unavailable,
                    "loading AppleNeuralEngine raised an exception that is not an NSException");
        }
    }
}

/* 1 when the private API can be used; otherwise 0 with the reason in err. */
static int api_ready(char *err, size_t err_len) {
    pthread_once(&g_load_once, load_api);
    if (g_unavailable[0]) {
        err_set(err, err_len, "Apple Neural Engine unavailable: %s", g_unavailable);
        return 0;
    }
    return 1;
}

int anecy_ane_available(char *why, size_t why_len) {
    err_clear(why, why_len);
    pthread_once(&g_load_once, load_api);
    if (g_unavailable[0]) {
        err_set(why, why_len, "%s", g_unavailable);
        return 0;
    }
    return 1;
}

int anecy_ane_compile_count(void) {
    return __atomic_load_n(&g_compiles, __ATOMIC_ACQUIRE);
}

/* ---------------------------------------------------------------- temp directories */

/* Both called with g_lock held. */
static void dir_acquire(NSString *dir) {
    if (!g_dirs) g_dirs = [NSMutableDictionary dictionary];
    NSNumber *n = [g_dirs objectForKey:dir];
    [g_dirs setObject:[NSNumber numberWithInteger:(n ? [n integerValue] : 0) + 1] forKey:dir];
}

static void dir_release(NSString *dir) {
    NSNumber *n = [g_dirs objectForKey:dir];
    NSInteger left = (n ? [n integerValue] : 1) - 1;
    if (left > 0) {
        [g_dirs setObject:[NSNumber numberWithInteger:left] forKey:dir];
        return;
    }
    [g_dirs removeObjectForKey:dir];
    [[NSFileManager defaultManager] removeItemAtPath:dir error:NULL];
}

/* A blob path below @model_path/ without empty, "." or ".." components. */
static int blob_path_ok(const char *path) {
    size_t plen = strlen(kModelPathPrefix);
    if (!path || strncmp(path, kModelPathPrefix, plen) != 0) return 0;
    const char *p = path + plen;
    if (!*p) return 0;
    while (*p) {
        const char *slash = strchr(p, '/');
        size_t n = slash ? (size_t)(slash - p) : strlen(p);
        if (n == 0 || (n == 1 && p[0] == '.') || (n == 2 && p[0] == '.' && p[1] == '.')) return 0;
        if (!slash) break;
        p = slash + 1;
        if (!*p) return 0; /* trailing slash */
    }
    return 1;
}

static BOOL make_dir(NSString *path, char *err, size_t err_len) {
    NSError *error = nil;
    if ([[NSFileManager defaultManager] createDirectoryAtPath:path withIntermediateDirectories:YES
                                                   attributes:nil error:&error])
        return YES;
    err_set(err, err_len, "creating directory %s failed: %s", utf8_or(path, "?"),
            utf8_or([error description], "no NSError was returned"));
    return NO;
}

static BOOL write_file(NSData *data, NSString *path, char *err, size_t err_len) {
    if (!make_dir([path stringByDeletingLastPathComponent], err, err_len)) return NO;
    NSError *error = nil;
    if ([data writeToFile:path options:NSDataWritingAtomic error:&error]) return YES;
    err_set(err, err_len, "writing %s failed: %s", utf8_or(path, "?"),
            utf8_or([error description], "no NSError was returned"));
    return NO;
}

/* ---------------------------------------------------------------- compile */

/* A directory name from hexStringIdentifier: one path component, not "." or "..". */
static BOOL identifier_ok(id identifier) {
    if (![identifier isKindOfClass:[NSString class]]) return NO;
    const char *c = [(NSString *)identifier UTF8String];
    return c && c[0] && !strchr(c, '/') && strcmp(c, ".") != 0 && strcmp(c, "..") != 0;
}

/* Writes the files, compiles and loads; with g_lock held. The caller owns dir's count. */
static anecy_ane_kernel *compile_in_dir(id model, NSString *dir, NSData *mil, NSArray<NSString *> *relative_paths,
                                        NSArray<NSData *> *contents, char *err, size_t err_len) {
    if (!make_dir([dir stringByAppendingPathComponent:@"weights"], err, err_len) ||
        !write_file(mil, [dir stringByAppendingPathComponent:@"model.mil"], err, err_len))
        return NULL;
    for (NSUInteger i = 0; i < [contents count]; i++) {
        if (!write_file([contents objectAtIndex:i],
                        [dir stringByAppendingPathComponent:[relative_paths objectAtIndex:i]], err, err_len))
            return NULL;
    }

    NSError *error = nil;
    __atomic_add_fetch(&g_compiles, 1, __ATOMIC_ACQ_REL);
    if (!((QosOptionsErrorFn)objc_msgSend)(model, @selector(compileWithQoS:options:error:), ANECY_ANE_QOS,
                                           @{}, &error)) {
        err_nserror(err, err_len, "compileWithQoS:options:error:", error);
        return NULL;
    }
    error = nil;
    if (!((QosOptionsErrorFn)objc_msgSend)(model, @selector(loadWithQoS:options:error:), ANECY_ANE_QOS, @{},
                                           &error)) {
        err_nserror(err, err_len, "loadWithQoS:options:error:", error);
        return NULL;
    }

    anecy_ane_kernel *kernel = calloc(1, sizeof *kernel);
    if (!kernel) {
        error = nil;
        ((UnloadFn)objc_msgSend)(model, @selector(unloadWithQoS:error:), ANECY_ANE_QOS, &error);
        err_set(err, err_len, "out of memory");
        return NULL;
    }
    kernel->model = CFBridgingRetain(model);
    kernel->tmp_dir = CFBridgingRetain(dir);
    kernel->refs = 1;
    return kernel;
}

/* Called with g_lock held, inside an autorelease pool and @try. */
static anecy_ane_kernel *compile_locked(const char *mil_text, const anecy_ane_blob *blobs, int n_blobs,
                                        char *err, size_t err_len) {
    NSData *mil = [NSData dataWithBytes:mil_text length:strlen(mil_text)];
    /* weights: MIL path -> {offset, data}, the form modelWithMILText:weights:optionsPlist: takes */
    NSMutableDictionary<NSString *, NSDictionary *> *weights =
        [NSMutableDictionary dictionaryWithCapacity:(NSUInteger)n_blobs];
    NSMutableArray<NSString *> *relative_paths = [NSMutableArray arrayWithCapacity:(NSUInteger)n_blobs];
    NSMutableArray<NSData *> *contents = [NSMutableArray arrayWithCapacity:(NSUInteger)n_blobs];
    for (int i = 0; i < n_blobs; i++) {
        NSString *key = [NSString stringWithUTF8String:blobs[i].path];
        NSString *relative = [NSString stringWithUTF8String:blobs[i].path + strlen(kModelPathPrefix)];
        if (!key || !relative) {
            err_set(err, err_len, "blob %d: path is not valid UTF-8", i);
            return NULL;
        }
        if ([weights objectForKey:key]) {
            err_set(err, err_len, "blob %d: path %s given twice", i, blobs[i].path);
            return NULL;
        }
        NSData *bytes = [NSData dataWithBytes:blobs[i].data length:blobs[i].length];
        [weights setObject:@{@"offset" : @0, @"data" : bytes} forKey:key];
        [relative_paths addObject:relative];
        [contents addObject:bytes];
    }

    id descriptor = ((DescriptorFn)objc_msgSend)(
        g_descriptor_class, @selector(modelWithMILText:weights:optionsPlist:), mil, weights, nil);
    if (!descriptor) {
        err_set(err, err_len, "_ANEInMemoryModelDescriptor modelWithMILText:weights:optionsPlist: "
                              "returned nil (MIL text or weights rejected)");
        return NULL;
    }
    id model = ((ModelFn)objc_msgSend)(g_model_class, @selector(inMemoryModelWithDescriptor:), descriptor);
    if (!model) {
        err_set(err, err_len, "_ANEInMemoryModel inMemoryModelWithDescriptor: returned nil");
        return NULL;
    }
    id identifier = ((IdentifierFn)objc_msgSend)(model, @selector(hexStringIdentifier));
    if (!identifier_ok(identifier)) {
        err_set(err, err_len, "hexStringIdentifier returned no usable directory name");
        return NULL;
    }

    /* The framework reads the program and its weights from NSTemporaryDirectory()/<id>/. */
    NSString *dir = [NSTemporaryDirectory() stringByAppendingPathComponent:(NSString *)identifier];
    dir_acquire(dir);
    anecy_ane_kernel *kernel = NULL;
    @try {
        kernel = compile_in_dir(model, dir, mil, relative_paths, contents, err, err_len);
    } @catch (...) {
        dir_release(dir);
        @throw;
    }
    if (!kernel) dir_release(dir);
    return kernel;
}

anecy_ane_kernel *anecy_ane_compile(const char *mil_text, const anecy_ane_blob *blobs, int n_blobs,
                                    char *err, size_t err_len) {
    err_clear(err, err_len);
    if (!mil_text || !mil_text[0]) {
        err_set(err, err_len, "empty MIL text");
        return NULL;
    }
    if (n_blobs < 0 || (n_blobs > 0 && !blobs)) {
        err_set(err, err_len, "invalid blob list (n_blobs=%d)", n_blobs);
        return NULL;
    }
    for (int i = 0; i < n_blobs; i++) {
        if (!blob_path_ok(blobs[i].path)) {
            err_set(err, err_len, "blob %d: path %s must be %s<relative path> without . or .. parts", i,
                    blobs[i].path ? blobs[i].path : "(null)", kModelPathPrefix);
            return NULL;
        }
        if (!blobs[i].data && blobs[i].length) {
            err_set(err, err_len, "blob %d (%s): no data for %zu bytes", i, blobs[i].path, blobs[i].length);
            return NULL;
        }
    }
    if (!api_ready(err, err_len)) return NULL;

    anecy_ane_kernel *kernel = NULL;
    pthread_mutex_lock(&g_lock);
    @autoreleasepool {
        @try {
            kernel = compile_locked(mil_text, blobs, n_blobs, err, err_len);
        } @catch (NSException *ex) {
            err_exception(err, err_len, "compiling the MIL program", ex);
        } @catch (...) {
            err_set(err, err_len, "compiling the MIL program raised an exception that is not an NSException");
        }
    }
    pthread_mutex_unlock(&g_lock);
    return kernel;
}

/* Drops one reference; the last one unloads the model and removes its temp dir. */
static void kernel_release(anecy_ane_kernel *kernel) {
    if (__atomic_sub_fetch(&kernel->refs, 1, __ATOMIC_ACQ_REL) != 0) return;
    pthread_mutex_lock(&g_lock);
    @autoreleasepool {
        id model = CFBridgingRelease(kernel->model);
        NSString *dir = CFBridgingRelease(kernel->tmp_dir);
        kernel->model = NULL;
        kernel->tmp_dir = NULL;
        @try {
            NSError *error = nil;
            ((UnloadFn)objc_msgSend)(model, @selector(unloadWithQoS:error:), ANECY_ANE_QOS, &error);
        } @catch (...) {
            /* nothing to report to: the kernel is gone either way */
        }
        @try {
            dir_release(dir);
        } @catch (...) {
        }
    } /* model and dir are released here, before the struct is freed */
    pthread_mutex_unlock(&g_lock);
    free(kernel);
}

void anecy_ane_kernel_free(anecy_ane_kernel *kernel) {
    if (kernel) kernel_release(kernel);
}

/* ---------------------------------------------------------------- surfaces */

anecy_ane_surface *anecy_ane_surface_create(size_t bytes, char *err, size_t err_len) {
    err_clear(err, err_len);
    if (bytes == 0) {
        err_set(err, err_len, "surface size must be positive");
        return NULL;
    }
    anecy_ane_surface *surface = calloc(1, sizeof *surface);
    if (!surface) {
        err_set(err, err_len, "out of memory");
        return NULL;
    }
    IOSurfaceRef ref = NULL;
    @autoreleasepool {
        @try {
            NSNumber *size = [NSNumber numberWithUnsignedLong:(unsigned long)bytes];
            NSDictionary *properties = @{
                (__bridge NSString *)kIOSurfaceWidth : size,
                (__bridge NSString *)kIOSurfaceHeight : @1,
                (__bridge NSString *)kIOSurfaceBytesPerElement : @1,
                (__bridge NSString *)kIOSurfaceBytesPerRow : size,
                (__bridge NSString *)kIOSurfaceAllocSize : size,
                (__bridge NSString *)kIOSurfacePixelFormat : @0,
            };
            ref = IOSurfaceCreate((__bridge CFDictionaryRef)properties);
            if (!ref) {
                err_set(err, err_len, "IOSurfaceCreate failed for %zu bytes", bytes);
            } else if (IOSurfaceGetAllocSize(ref) < bytes) {
                err_set(err, err_len, "IOSurfaceCreate gave %zu bytes, %zu requested",
                        IOSurfaceGetAllocSize(ref), bytes);
                CFRelease(ref);
                ref = NULL;
            }
        } @catch (NSException *ex) {
            err_exception(err, err_len, "IOSurfaceCreate", ex);
        } @catch (...) {
            err_set(err, err_len, "IOSurfaceCreate raised an exception that is not an NSException");
        }
    }
    if (!ref) {
        free(surface);
        return NULL;
    }
    surface->surface = ref;
    surface->bytes = bytes;
    return surface;
}

void *anecy_ane_surface_lock(anecy_ane_surface *surface) {
    if (!surface) return NULL;
    if (IOSurfaceLock(surface->surface, 0, NULL) != KERN_SUCCESS) return NULL;
    return IOSurfaceGetBaseAddress(surface->surface);
}

void anecy_ane_surface_unlock(anecy_ane_surface *surface) {
    if (surface) IOSurfaceUnlock(surface->surface, 0, NULL);
}

size_t anecy_ane_surface_bytes(const anecy_ane_surface *surface) {
    return surface ? surface->bytes : 0;
}

void anecy_ane_surface_free(anecy_ane_surface *surface) {
    if (!surface) return;
    CFRelease(surface->surface);
    free(surface);
}

/* ---------------------------------------------------------------- requests */

static id request_build(anecy_ane_surface *in, anecy_ane_surface *out, char *err, size_t err_len) {
    id input = ((SurfaceObjectFn)objc_msgSend)(g_surface_object_class, @selector(objectWithIOSurface:),
                                               in->surface);
    id output = ((SurfaceObjectFn)objc_msgSend)(g_surface_object_class, @selector(objectWithIOSurface:),
                                                out->surface);
    if (!input || !output) {
        err_set(err, err_len, "_ANEIOSurfaceObject objectWithIOSurface: returned nil");
        return nil;
    }
    id request = ((RequestFn)objc_msgSend)(
        g_request_class,
        @selector(requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:),
        @[ input ], @[ @0 ], @[ output ], @[ @0 ], nil, nil, @0);
    if (!request) err_set(err, err_len, "_ANERequest requestWithInputs:... returned nil");
    return request;
}

anecy_ane_request *anecy_ane_request_create(anecy_ane_kernel *kernel, anecy_ane_surface *in,
                                            anecy_ane_surface *out, char *err, size_t err_len) {
    err_clear(err, err_len);
    if (!kernel || !in || !out) {
        err_set(err, err_len, "request needs a kernel, an input and an output surface");
        return NULL;
    }
    if (!api_ready(err, err_len)) return NULL;
    anecy_ane_request *request = calloc(1, sizeof *request);
    if (!request) {
        err_set(err, err_len, "out of memory");
        return NULL;
    }
    @autoreleasepool {
        @try {
            id built = request_build(in, out, err, err_len);
            if (built) request->request = CFBridgingRetain(built);
        } @catch (NSException *ex) {
            err_exception(err, err_len, "creating the _ANERequest", ex);
        } @catch (...) {
            err_set(err, err_len, "creating the _ANERequest raised an exception that is not an NSException");
        }
    }
    if (!request->request) {
        free(request);
        return NULL;
    }
    __atomic_add_fetch(&kernel->refs, 1, __ATOMIC_ACQ_REL);
    request->kernel = kernel;
    CFRetain(in->surface);
    CFRetain(out->surface);
    request->in = in->surface;
    request->out = out->surface;
    return request;
}

int anecy_ane_evaluate(anecy_ane_request *request, char *err, size_t err_len) {
    err_clear(err, err_len);
    if (!request) {
        err_set(err, err_len, "no request");
        return -1;
    }
    int rc = -1;
    @autoreleasepool {
        @try {
            id model = (__bridge id)request->kernel->model;
            id ane_request = (__bridge id)request->request;
            NSError *error = nil;
            if (((EvaluateFn)objc_msgSend)(model, @selector(evaluateWithQoS:options:request:error:), ANECY_ANE_QOS,
                                           @{}, ane_request, &error)) {
                rc = 0;
            } else {
                err_nserror(err, err_len, "evaluateWithQoS:options:request:error:", error);
            }
        } @catch (NSException *ex) {
            err_exception(err, err_len, "evaluateWithQoS:options:request:error:", ex);
        } @catch (...) {
            err_set(err, err_len,
                    "evaluateWithQoS:options:request:error: raised an exception that is not an NSException");
        }
    }
    return rc;
}

void anecy_ane_request_free(anecy_ane_request *request) {
    if (!request) return;
    @autoreleasepool {
        (void)CFBridgingRelease(request->request); /* ARC releases the _ANERequest here */
        request->request = NULL;
    }
    CFRelease(request->in);
    CFRelease(request->out);
    kernel_release(request->kernel);
    free(request);
}
