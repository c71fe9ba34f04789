#!/usr/bin/env python3
"""Compare the stub SDK in tools/objc_check/sdk with a real macOS SDK.

Every Objective-C method and property, and every function, typedef and global declared in
the stubs must exist in the SDK with the same type (nullability, ownership qualifiers and
ownership attributes included). Availability and Swift annotations are not compared.

    python3 tools/objc_check/compare_sdk.py                  # on a Mac: xcrun's SDK
    python3 tools/objc_check/compare_sdk.py --sdk PATH       # any MacOSX.sdk directory

Exit status 0 when the stubs match, 1 with the differences listed otherwise. Needs clang
(Apple's or Debian's) and an SDK, so it is not part of the test suite.
"""
import argparse
import glob
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
STUBS = os.path.join(HERE, "sdk")
TU = """#import <Foundation/Foundation.h>
#import <IOSurface/IOSurface.h>
#import <objc/message.h>
#import <objc/runtime.h>
"""
# Attributes that change what a declaration means to ARC or to a caller.
KEPT_ATTRS = {
    "CFReturnsRetainedAttr", "CFConsumedAttr", "NSReturnsRetainedAttr", "NSConsumedAttr",
    "NSConsumesSelfAttr", "ObjCReturnsInnerPointerAttr", "FormatArgAttr", "UnavailableAttr",
}
# Names the stubs take from the C library rather than declare.
LIBC = {"size_t", "uint32_t", "int32_t", "uint64_t", "int64_t", "va_list", "bool"}


def ast(clang, args):
    with tempfile.TemporaryDirectory() as tmp:
        tu = os.path.join(tmp, "decls.m")
        with open(tu, "w") as f:
            f.write(TU)
        cmd = [clang, "-x", "objective-c", "-fobjc-arc", "-fsyntax-only", "-Xclang",
               "-ast-dump=json", *args, tu]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"compare_sdk: {' '.join(cmd)} failed:\n{out.stderr}")
        return json.loads(out.stdout)


def declarations(root):
    found = {}

    def add(key, value):
        found.setdefault(key, set()).add(value)

    def visit(node, container):
        kind, name = node.get("kind"), node.get("name")
        inner = node.get("inner") or []
        attrs = tuple(sorted({c.get("kind") for c in inner} & KEPT_ATTRS))
        if kind in ("ObjCInterfaceDecl", "ObjCProtocolDecl"):
            container = name
        elif kind == "ObjCCategoryDecl":
            container = node.get("interface", {}).get("name")
        elif kind == "ObjCMethodDecl":
            params = tuple(c.get("type", {}).get("qualType") for c in inner
                           if c.get("kind") == "ParmVarDecl")
            sign = "-" if node.get("instance", True) else "+"
            add(("method", container, sign + name),
                (node.get("returnType", {}).get("qualType"), params, attrs))
        elif kind == "ObjCPropertyDecl":
            flags = tuple(f for f in ("readonly", "copy", "strong", "class", "nullability")
                          if node.get(f))
            add(("property", container, name), (node.get("type", {}).get("qualType"), flags))
        elif container is None and kind == "FunctionDecl":
            add(("function", None, name), (node.get("type", {}).get("qualType"), attrs))
        elif container is None and kind in ("TypedefDecl", "VarDecl"):
            add((kind, None, name), node.get("type", {}).get("qualType"))
        for child in inner:
            visit(child, container)

    visit(root, None)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sdk", help="MacOSX.sdk directory (default: xcrun --show-sdk-path)")
    parser.add_argument("--clang", default=os.environ.get("CLANG", "clang"))
    opts = parser.parse_args()
    sdk = opts.sdk
    if not sdk:
        try:
            sdk = subprocess.run(["xcrun", "--show-sdk-path"], capture_output=True, text=True,
                                 check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            sys.exit("compare_sdk: no --sdk given and xcrun cannot find one")
    arch = "arm64" if platform.machine() in ("arm64", "aarch64") else "x86_64"

    stub = declarations(ast(opts.clang, ["-fobjc-runtime=macosx-15.0", "-isystem", STUBS]))
    real = declarations(ast(opts.clang, [
        "-target", f"{arch}-apple-macos13.0", "-isysroot", sdk,
        "-iframework", os.path.join(sdk, "System", "Library", "Frameworks"),
    ]))

    text = "".join(open(p).read()
                   for p in glob.glob(os.path.join(STUBS, "**", "*.h"), recursive=True))
    declared = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text)) - LIBC
    problems = []
    checked = 0
    for key, values in sorted(stub.items(), key=str):
        if key[0] in ("function", "TypedefDecl", "VarDecl") and key[2] not in declared:
            continue  # from the C library headers, not from a stub
        checked += 1
        if key not in real:
            problems.append(f"not in the SDK: {key}")
            continue
        for value in values - real[key]:
            problems.append(f"differs: {key}\n    stub: {value}\n"
                            f"    SDK:  {sorted(real[key], key=str)}")
    for p in problems:
        print(p)
    print(f"compare_sdk: {checked} stub declarations checked against {sdk}: "
          f"{'all match' if not problems else f'{len(problems)} differ'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
