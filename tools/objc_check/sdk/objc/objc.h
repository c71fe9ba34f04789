/* Stub of <objc/objc.h> for tools/objc_check (see ../../README.md). */
#ifndef _OBJC_OBJC_H_
#define _OBJC_OBJC_H_

#include <stdlib.h>
#include <objc/objc-api.h>
#include <stdbool.h>

typedef struct objc_class *Class;
struct objc_object {
    Class _Nonnull isa;
};
typedef struct objc_object *id;

#ifdef __OBJC__
@class Protocol;
#else
typedef struct objc_object Protocol;
#endif

typedef struct objc_selector *SEL;

#if !OBJC_OLD_DISPATCH_PROTOTYPES
typedef void (*IMP)(void /* id, SEL, ... */);
#else
typedef id _Nullable (*IMP)(id _Nonnull, SEL _Nonnull, ...);
#endif

/* macOS: BOOL is bool where the compiler says so (arm64), signed char elsewhere. */
#if defined(__OBJC_BOOL_IS_BOOL) && __OBJC_BOOL_IS_BOOL
#define OBJC_BOOL_IS_BOOL 1
typedef bool BOOL;
#else
#define OBJC_BOOL_IS_BOOL 0
#define OBJC_BOOL_IS_CHAR 1
typedef signed char BOOL;
#endif
#define OBJC_BOOL_DEFINED

#if __has_feature(objc_bool)
#define YES __objc_yes
#define NO __objc_no
#else
#define YES ((BOOL)1)
#define NO ((BOOL)0)
#endif

#ifndef Nil
#if __has_feature(cxx_nullptr)
#define Nil nullptr
#else
#define Nil ((void *)0)
#endif
#endif

#ifndef nil
#if __has_feature(cxx_nullptr)
#define nil nullptr
#else
#define nil ((void *)0)
#endif
#endif

OBJC_EXPORT const char * _Nonnull sel_getName(SEL _Nonnull sel);

#endif
