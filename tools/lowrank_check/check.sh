#!/usr/bin/env bash
# Check anecy/_lowrank.h's loops against a double-precision reference (lowrank_check.c):
#   - built for this machine with the C compiler $CC (its dispatched path and the portable
#     one);
#   - on a non-arm64 machine also cross-built for arm64 and run under qemu, so that the
#     loops are checked as an arm64 compiler vectorises them (Debian/Ubuntu:
#     apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross).
# Exits non-zero on the first result out of bounds; with --native, checks this machine only.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

"${CC:-cc}" -O3 -Wall -Wextra -Werror -I"$root/anecy" "$here/lowrank_check.c" -o "$out/native" -lm
"$out/native"
if [ "${1:-}" = "--native" ] || [ "$(uname -m)" = "aarch64" ] || [ "$(uname -m)" = "arm64" ]; then
    exit 0
fi
aarch64-linux-gnu-gcc -O3 -Wall -Wextra -Werror -static -I"$root/anecy" \
    "$here/lowrank_check.c" -o "$out/arm64" -lm
qemu-aarch64 "$out/arm64"
