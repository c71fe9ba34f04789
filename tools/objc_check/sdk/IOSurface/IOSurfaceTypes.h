/* Stub of <IOSurface/IOSurfaceTypes.h> for tools/objc_check (see ../../README.md). */
#ifndef IOSURFACE_TYPES_H
#define IOSURFACE_TYPES_H

#include <IOSurface/IOSurfaceBase.h>

typedef CF_OPTIONS(uint32_t, IOSurfaceLockOptions)
{
    kIOSurfaceLockReadOnly  = 0x00000001,
    kIOSurfaceLockAvoidSync = 0x00000002,
};

#endif
