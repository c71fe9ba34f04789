#!/usr/bin/env bash
# Check anecy/_fp16.h's vector paths against its scalar reference (fp16_check.c):
#   - built for this machine (F16C on x86-64, NEON on arm64), with the C compiler $CC;
#   - on a non-arm64 machine also cross-built for arm64 and run under qemu, so that the
#     NEON path is checked where no arm64 machine is at hand (Debian/Ubuntu:
#     apt-get install qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross).
# Exits non-zero on the first difference; with --native, checks this machine's path only.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

"${CC:-cc}" -O2 -Wall -Wextra -Werror -I"$root/anecy" "$here/fp16_check.c" -o "$out/native"
"$out/native"
if [ "${1:-}" = "--native" ] || [ "$(uname -m)" = "aarch64" ] || [ "$(uname -m)" = "arm64" ]; then
    exit 0
fi
aarch64-linux-gnu-gcc -O2 -Wall -Wextra -Werror -static -I"$root/anecy" \
    "$here/fp16_check.c" -o "$out/arm64"
qemu-aarch64 "$out/arm64"
