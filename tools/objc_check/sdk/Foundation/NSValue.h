/* Stub of <Foundation/NSValue.h> for tools/objc_check (see ../../README.md). */
#ifndef _ANECY_STUB_FOUNDATION_NSVALUE_H
#define _ANECY_STUB_FOUNDATION_NSVALUE_H

#import <Foundation/NSObject.h>

@class NSString, NSDictionary;

NS_ASSUME_NONNULL_BEGIN

@interface NSValue : NSObject <NSCopying, NSSecureCoding>
@end

@interface NSNumber : NSValue

@property (readonly) NSInteger integerValue;

@end

/* Boxed literals call these too: @0 -> numberWithInt:, @((size_t)n) -> numberWithUnsignedLong:. */
@interface NSNumber (NSNumberCreation)

+ (NSNumber *)numberWithInt:(int)value;
+ (NSNumber *)numberWithUnsignedLong:(unsigned long)value;
+ (NSNumber *)numberWithInteger:(NSInteger)value;

@end

NS_ASSUME_NONNULL_END

#endif
