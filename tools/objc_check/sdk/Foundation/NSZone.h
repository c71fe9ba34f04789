/* Stub of <Foundation/NSZone.h> for tools/objc_check (see ../../README.md). */
#ifndef _ANECY_STUB_FOUNDATION_NSZONE_H
#define _ANECY_STUB_FOUNDATION_NSZONE_H

#include <Foundation/NSObjCRuntime.h>

typedef struct _NSZone NSZone;

#endif
