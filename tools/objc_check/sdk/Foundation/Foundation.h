/* Stub of <Foundation/Foundation.h> for tools/objc_check (see ../../README.md):
 * the parts of Foundation that anecy/objc/ane_shim.m uses. */
#ifndef _ANECY_STUB_FOUNDATION_H
#define _ANECY_STUB_FOUNDATION_H

#include <CoreFoundation/CoreFoundation.h>

#import <Foundation/NSObjCRuntime.h>
#import <Foundation/NSObject.h>
#import <Foundation/NSZone.h>
#import <Foundation/NSString.h>
#import <Foundation/NSPathUtilities.h>
#import <Foundation/NSData.h>
#import <Foundation/NSArray.h>
#import <Foundation/NSDictionary.h>
#import <Foundation/NSValue.h>
#import <Foundation/NSError.h>
#import <Foundation/NSException.h>
#import <Foundation/NSFileManager.h>

#endif
