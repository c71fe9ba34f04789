/* Stub of <Foundation/NSFileManager.h> for tools/objc_check (see ../../README.md). */
#ifndef _ANECY_STUB_FOUNDATION_NSFILEMANAGER_H
#define _ANECY_STUB_FOUNDATION_NSFILEMANAGER_H

#import <Foundation/NSObject.h>
#import <Foundation/NSDictionary.h>
#import <Foundation/NSPathUtilities.h>
#import <Foundation/NSError.h>
#import <CoreFoundation/CFBase.h>

@class NSArray<ObjectType>, NSData, NSError, NSNumber;

NS_ASSUME_NONNULL_BEGIN

typedef NSString * NSFileAttributeKey NS_TYPED_EXTENSIBLE_ENUM;

@interface NSFileManager : NSObject

@property (class, readonly, strong) NSFileManager *defaultManager;

- (BOOL)createDirectoryAtPath:(NSString *)path withIntermediateDirectories:(BOOL)createIntermediates attributes:(nullable NSDictionary<NSFileAttributeKey, id> *)attributes error:(NSError **)error;
- (BOOL)removeItemAtPath:(NSString *)path error:(NSError **)error;

@end

NS_ASSUME_NONNULL_END

#endif
