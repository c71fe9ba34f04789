/* Stub of <objc/message.h> for tools/objc_check (see ../../README.md). */
#ifndef _OBJC_MESSAGE_H
#define _OBJC_MESSAGE_H

#include <objc/objc.h>

/* As in the SDK (OBJC_OLD_DISPATCH_PROTOTYPES == 0): objc_msgSend has no usable prototype,
 * so every call must cast it to the exact function type of the method it sends. */
#if !OBJC_OLD_DISPATCH_PROTOTYPES
#pragma clang diagnostic push
#pragma clang diagnostic ignored "-Wincompatible-library-redeclaration"
OBJC_EXPORT void objc_msgSend(void /* id self, SEL op, ... */);
#pragma clang diagnostic pop
#else
OBJC_EXPORT id _Nullable objc_msgSend(id _Nullable self, SEL _Nonnull op, ...);
#endif

#endif
