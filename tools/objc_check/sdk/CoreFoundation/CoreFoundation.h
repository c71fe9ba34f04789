/* Stub of <CoreFoundation/CoreFoundation.h> for tools/objc_check (see ../../README.md). */
#ifndef __COREFOUNDATION_COREFOUNDATION__
#define __COREFOUNDATION_COREFOUNDATION__

#include <limits.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <CoreFoundation/CFBase.h>
#include <CoreFoundation/CFDictionary.h>

#endif
