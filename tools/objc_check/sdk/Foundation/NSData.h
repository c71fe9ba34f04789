/* Stub of <Foundation/NSData.h> for tools/objc_check (see ../../README.md). */
#ifndef _ANECY_STUB_FOUNDATION_NSDATA_H
#define _ANECY_STUB_FOUNDATION_NSDATA_H

#import <Foundation/NSObject.h>

@class NSString, NSError;

NS_ASSUME_NONNULL_BEGIN

typedef NS_OPTIONS(NSUInteger, NSDataWritingOptions) {
    NSDataWritingAtomic = 1UL << 0,
};

@interface NSData : NSObject <NSCopying, NSMutableCopying, NSSecureCoding>
@end

@interface NSData (NSExtendedData)

- (BOOL)writeToFile:(NSString *)path options:(NSDataWritingOptions)writeOptionsMask error:(NSError **)errorPtr;

@end

@interface NSData (NSDataCreation)

+ (instancetype)dataWithBytes:(nullable const void *)bytes length:(NSUInteger)length;

@end

NS_ASSUME_NONNULL_END

#endif
