/* Stub of <objc/runtime.h> for tools/objc_check (see ../../README.md). */
#ifndef _OBJC_RUNTIME_H
#define _OBJC_RUNTIME_H

#include <objc/objc.h>

OBJC_EXPORT Class _Nullable object_getClass(id _Nullable obj);

OBJC_EXPORT const char * _Nonnull class_getName(Class _Nullable cls);

OBJC_EXPORT BOOL class_respondsToSelector(Class _Nullable cls, SEL _Nonnull sel);

#endif
