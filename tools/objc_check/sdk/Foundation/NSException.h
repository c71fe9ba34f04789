/* Stub of <Foundation/NSException.h> for tools/objc_check (see ../../README.md). */
#ifndef _ANECY_STUB_FOUNDATION_NSEXCEPTION_H
#define _ANECY_STUB_FOUNDATION_NSEXCEPTION_H

#import <Foundation/NSObject.h>
#import <Foundation/NSString.h>
#import <stdarg.h>

@class NSString, NSDictionary, NSArray<ObjectType>, NSNumber;

NS_ASSUME_NONNULL_BEGIN

#if __OBJC2__
__attribute__((__objc_exception__))
#endif
@interface NSException : NSObject <NSCopying, NSSecureCoding>

@property (readonly, copy) NSExceptionName name;
@property (nullable, readonly, copy) NSString *reason;

@end

NS_ASSUME_NONNULL_END

#endif
