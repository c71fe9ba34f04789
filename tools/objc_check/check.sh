#!/usr/bin/env bash
# Checks the Objective-C shim without a Mac: Debian's clang parses and type-checks it in ARC
# mode (-fsyntax-only: nothing is compiled or linked) against the stub SDK in sdk/, whose
# declarations have the signatures of Apple's macOS SDK. Errors are real ARC and type errors.
#
#   tools/objc_check/check.sh [FILE.m]     (default: anecy/objc/ane_shim.m, and then
#                                           check_accel.sh: the C that calls Accelerate)
#
# Needs clang: apt-get update && apt-get install -y clang
# CLANG=... selects another clang binary.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
sdk="$here/sdk"
src="${1:-$root/anecy/objc/ane_shim.m}"
clang="${CLANG:-clang}"
# Include directories from the environment would be searched before the stubs.
unset CPATH C_INCLUDE_PATH OBJC_INCLUDE_PATH

if ! command -v "$clang" >/dev/null 2>&1; then
    echo "objc_check: '$clang' is not installed; install it with: apt-get update && apt-get install -y clang" >&2
    exit 127
fi
if [ ! -f "$src" ]; then
    echo "objc_check: no such file: $src" >&2
    exit 2
fi

# -isystem puts the stubs ahead of every system include directory, so a stub always wins
# over a same-named header elsewhere (GNUstep's Foundation, GCC's objc/). -I finds
# ane_shim.h for a copy of the .m that lies elsewhere.
flags=(
    -x objective-c
    -fobjc-arc
    -fobjc-runtime=macosx-15.0
    -fobjc-exceptions
    -Wall -Wextra -Werror
    -isystem "$sdk"
    -I "$root/anecy/objc"
)

"$clang" -fsyntax-only "${flags[@]}" "$src"

# Every Apple framework header the file reached must be one of the stubs: a header taken
# from anywhere else (a GNUstep install, say) would check against the wrong declarations.
foreign="$("$clang" -M "${flags[@]}" "$src" \
    | tr ' \\' '\n\n' \
    | grep -E '/(Foundation|CoreFoundation|IOSurface|objc|mach)/[^/]+\.h$' \
    | grep -v -F -e "$sdk/" -e "$root/anecy/objc/" -e "$(cd "$(dirname "$src")" && pwd)/" || true)"
if [ -n "$foreign" ]; then
    echo "objc_check: these headers did not come from the stub SDK in $sdk:" >&2
    echo "$foreign" >&2
    exit 1
fi

echo "objc_check: OK: ${src#"$root"/} ($("$clang" --version | head -n 1); ARC; stub macOS SDK)"

if [ $# -eq 0 ]; then
    bash "$here/check_accel.sh"
fi
