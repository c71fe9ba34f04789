/* Stub of <IOSurface/IOSurface.h> for tools/objc_check (see ../../README.md). */
#ifndef IOSURFACE_H
#define IOSURFACE_H 1

#include <IOSurface/IOSurfaceBase.h>
#include <IOSurface/IOSurfaceAPI.h>

#endif
