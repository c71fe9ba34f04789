/* Stub of <Foundation/NSError.h> for tools/objc_check (see ../../README.md). */
#ifndef _ANECY_STUB_FOUNDATION_NSERROR_H
#define _ANECY_STUB_FOUNDATION_NSERROR_H

#import <Foundation/NSObject.h>

@class NSDictionary<KeyType, ObjectType>, NSArray<ObjectType>, NSString;

NS_ASSUME_NONNULL_BEGIN

/* The shim reports an NSError by its description (domain, code, text and userInfo),
 * which NSObject's protocol declares. */
@interface NSError : NSObject <NSCopying, NSSecureCoding>
@end

NS_ASSUME_NONNULL_END

#endif
