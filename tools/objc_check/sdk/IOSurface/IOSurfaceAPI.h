/* Stub of <IOSurface/IOSurfaceAPI.h> for tools/objc_check (see ../../README.md). */
#ifndef IOSURFACE_API_H
#define IOSURFACE_API_H 1

#include <IOSurface/IOSurfaceBase.h>
#include <IOSurface/IOSurfaceTypes.h>
#include <IOSurface/IOSurfaceRef.h>

#endif
