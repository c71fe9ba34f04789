/* Stub of <Foundation/NSArray.h> for tools/objc_check (see ../../README.md). */
#ifndef _ANECY_STUB_FOUNDATION_NSARRAY_H
#define _ANECY_STUB_FOUNDATION_NSARRAY_H

#import <Foundation/NSObject.h>
#import <Foundation/NSObjCRuntime.h>

@class NSString;

NS_ASSUME_NONNULL_BEGIN

@interface NSArray<__covariant ObjectType> : NSObject <NSCopying, NSMutableCopying, NSSecureCoding>

@property (readonly) NSUInteger count;
- (ObjectType)objectAtIndex:(NSUInteger)index;

@end

@interface NSArray<ObjectType> (NSArrayCreation)

+ (instancetype)arrayWithObjects:(const ObjectType _Nonnull [_Nonnull])objects count:(NSUInteger)cnt;

@end

@interface NSMutableArray<ObjectType> : NSArray<ObjectType>

- (void)addObject:(ObjectType)anObject;

@end

@interface NSMutableArray<ObjectType> (NSMutableArrayCreation)

+ (instancetype)arrayWithCapacity:(NSUInteger)numItems;

@end

NS_ASSUME_NONNULL_END

#endif
