/* Stub of <IOSurface/IOSurfaceBase.h> for tools/objc_check (see ../../README.md). */
#ifndef IOSURFACE_BASE_H
#define IOSURFACE_BASE_H

#include <sys/cdefs.h>

#if __has_feature(objc_class_property)
#define IOSFC_SWIFT_NAME(name) __attribute__((swift_name(#name)))
#else
#define IOSFC_SWIFT_NAME(name)
#endif

#include <mach/kern_return.h>
#include <CoreFoundation/CoreFoundation.h>

#endif
