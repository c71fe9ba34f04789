/* Stub of <mach/kern_return.h> for tools/objc_check (see ../../README.md). */
#ifndef _MACH_KERN_RETURN_H_
#define _MACH_KERN_RETURN_H_

typedef int kern_return_t; /* <mach/machine/kern_return.h> on arm64 and x86_64 */

#define KERN_SUCCESS 0

#endif
