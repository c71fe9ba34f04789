/* Stub of <Foundation/NSString.h> for tools/objc_check (see ../../README.md). */
#ifndef _ANECY_STUB_FOUNDATION_NSSTRING_H
#define _ANECY_STUB_FOUNDATION_NSSTRING_H

#import <limits.h>
#import <Foundation/NSObject.h>
#import <stdarg.h>

@class NSData, NSArray<ObjectType>, NSDictionary<KeyType, ObjectType>, NSError;

NS_ASSUME_NONNULL_BEGIN

@interface NSString : NSObject <NSCopying, NSMutableCopying, NSSecureCoding>
@end

@interface NSString (NSStringExtensionMethods)

@property (nullable, readonly) const char *UTF8String NS_RETURNS_INNER_POINTER;

+ (nullable instancetype)stringWithUTF8String:(const char *)nullTerminatedCString NS_FORMAT_ARGUMENT(1);

@end

NS_ASSUME_NONNULL_END

#endif
