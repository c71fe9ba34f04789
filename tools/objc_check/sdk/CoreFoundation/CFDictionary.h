/* Stub of <CoreFoundation/CFDictionary.h> for tools/objc_check (see ../../README.md). */
#ifndef __COREFOUNDATION_CFDICTIONARY__
#define __COREFOUNDATION_CFDICTIONARY__

#include <CoreFoundation/CFBase.h>

CF_EXTERN_C_BEGIN

typedef const struct CF_BRIDGED_TYPE(NSDictionary) __CFDictionary * CFDictionaryRef;

CF_EXTERN_C_END

#endif
