/* Stub of <Foundation/NSPathUtilities.h> for tools/objc_check (see ../../README.md). */
#ifndef _ANECY_STUB_FOUNDATION_NSPATHUTILITIES_H
#define _ANECY_STUB_FOUNDATION_NSPATHUTILITIES_H

#import <Foundation/NSString.h>
#import <Foundation/NSArray.h>

NS_ASSUME_NONNULL_BEGIN

@interface NSString (NSStringPathExtensions)

@property (readonly, copy) NSString *stringByDeletingLastPathComponent;
- (NSString *)stringByAppendingPathComponent:(NSString *)str;

@end

FOUNDATION_EXPORT NSString *NSTemporaryDirectory(void);

NS_ASSUME_NONNULL_END

#endif
