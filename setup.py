"""Build of anecy's Cython core.

The Objective-C shim in anecy/objc/ is compiled only on macOS; everywhere else the
same package builds without it and runs the portable CPU backend.
"""
import glob
import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

IS_MAC = sys.platform == "darwin"

compile_args = ["-O3", "-fno-math-errno", "-fno-trapping-math"]
link_args = []
libraries = []
if IS_MAC:
    # the Objective-C shim is ARC code; clang accepts the flag on C sources too
    compile_args.append("-fobjc-arc")
    link_args += ["-framework", "Accelerate"]
else:
    libraries += ["pthread", "m"]
if os.environ.get("ANECY_NATIVE") == "1":
    # Opt-in for a local build tuned to this CPU (not portable to other machines).
    compile_args.append("-march=native")


def ext(name, extra_sources=(), extra_link=()):
    return Extension(
        f"anecy.{name}",
        [f"anecy/{name}.pyx", *extra_sources],
        include_dirs=["anecy", "anecy/objc"],
        # an edited C header rebuilds the modules (setuptools otherwise compares only the
        # generated .c with the built module)
        depends=sorted(glob.glob("anecy/*.h") + glob.glob("anecy/objc/*.h")),
        extra_compile_args=compile_args,
        extra_link_args=link_args + list(extra_link),
        libraries=libraries,
    )


# The ANE shim (ane_shim.m, ARC) is compiled into _ane_runtime on macOS only; elsewhere
# anecy/objc/ane_platform.h gives _ane_runtime fallbacks that report why there is no ANE.
objc_sources = sorted(glob.glob("anecy/objc/*.m")) if IS_MAC else []
objc_link = ["-framework", "Foundation", "-framework", "CoreFoundation",
             "-framework", "IOSurface", "-lobjc"]
extensions = [
    ext("_ops"),
    ext("_worker"),
    ext("_timeline"),
    ext("_ane_runtime", objc_sources, objc_link if objc_sources else []),
    ext("_engine"),
    ext("_packed"),
    ext("_testing"),
    ext("_decode"),
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True,
                             "initializedcheck": False},
    ),
)
