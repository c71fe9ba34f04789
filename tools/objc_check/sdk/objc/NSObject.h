/* Stub of <objc/NSObject.h> for tools/objc_check (see ../../README.md). */
#ifndef _OBJC_NSOBJECT_H_
#define _OBJC_NSOBJECT_H_

#if __OBJC__

#include <objc/objc.h>
#include <objc/NSObjCRuntime.h>

@class NSString;

@protocol NSObject

- (BOOL)isKindOfClass:(Class)aClass;

/* Kept so that ARC code using them fails here with the SDK's own diagnostics. */
- (instancetype)retain OBJC_ARC_UNAVAILABLE;
- (oneway void)release OBJC_ARC_UNAVAILABLE;
- (instancetype)autorelease OBJC_ARC_UNAVAILABLE;
- (NSUInteger)retainCount OBJC_ARC_UNAVAILABLE;

@property (readonly, copy) NSString *description;

@end

OBJC_ROOT_CLASS
OBJC_EXPORT
@interface NSObject <NSObject> {
    Class isa;
}

+ (Class)class;

@end

#endif

#endif
