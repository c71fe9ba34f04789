#!/usr/bin/env bash
# Checks anecy's C that calls Accelerate (anecy/_blas.h: cblas_sgemm; anecy/_accel.h: vDSP and
# vForce) without a Mac: clang type-checks it as macOS would compile it (__APPLE__ defined,
# so the Accelerate branches are taken) against the stub <Accelerate/Accelerate.h> in sdk/,
# whose declarations have the signatures of Apple's SDK. -fsyntax-only: nothing is built.
#
#   tools/objc_check/check_accel.sh
#
# CLANG=... selects another clang binary.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
clang="${CLANG:-clang}"
unset CPATH C_INCLUDE_PATH

if ! command -v "$clang" >/dev/null 2>&1; then
    echo "check_accel: '$clang' is not installed;" \
         "install it with: apt-get update && apt-get install -y clang" >&2
    exit 127
fi

flags=(-x c -std=c11 -U__linux__ -D__APPLE__ -Wall -Wextra -Werror -Wno-unused-function
       -isystem "$here/sdk" -I "$root/anecy")
src='#include "_blas.h"
#include "_accel.h"
#if !ANECY_ACCELERATE
#error "the Accelerate branch of _accel.h was not taken"
#endif
'
printf '%s' "$src" | "$clang" -fsyntax-only "${flags[@]}" -

# the Accelerate header must be the stub, not one found elsewhere
dep="$(printf '%s' "$src" | "$clang" -M "${flags[@]}" - | tr ' \\' '\n\n' \
    | grep -E '/Accelerate/Accelerate\.h$' || true)"
if [ "$dep" != "$here/sdk/Accelerate/Accelerate.h" ]; then
    echo "check_accel: <Accelerate/Accelerate.h> did not come from the stub SDK: $dep" >&2
    exit 1
fi
version="$("$clang" --version | head -n 1)"
echo "check_accel: OK: anecy/_blas.h, anecy/_accel.h ($version; stub Accelerate)"
