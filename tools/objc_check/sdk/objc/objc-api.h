/* Stub of <objc/objc-api.h> for tools/objc_check (see ../../README.md). */
#ifndef _OBJC_OBJC_API_H_
#define _OBJC_OBJC_API_H_

#if !defined(OBJC_OLD_DISPATCH_PROTOTYPES)
#define OBJC_OLD_DISPATCH_PROTOTYPES 0
#endif

#if defined(__cplusplus)
#define OBJC_EXTERN extern "C"
#else
#define OBJC_EXTERN extern
#endif
#define OBJC_VISIBLE __attribute__((visibility("default")))
#define OBJC_EXPORT OBJC_EXTERN OBJC_VISIBLE

#if __has_attribute(objc_root_class)
#define OBJC_ROOT_CLASS __attribute__((objc_root_class))
#else
#define OBJC_ROOT_CLASS
#endif

#if __has_feature(objc_arc)
#define OBJC_ARC_UNAVAILABLE __attribute__((unavailable("not available in automatic reference counting mode")))
#else
#define OBJC_ARC_UNAVAILABLE
#endif

#endif
