"""The Objective-C shim (anecy/objc), checked without a Mac.

tools/objc_check/check.sh has Debian's clang parse and type-check ane_shim.m in ARC mode
against the stub macOS SDK in tools/objc_check/sdk. These tests run it on the shim, show
that it rejects real ARC and type errors (each next to a correct twin that it accepts, so a
rejection is for the intended reason), and check that ane_shim.h is plain C and C++.
"""
import re
import subprocess
from pathlib import Path

import pytest

from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tools" / "objc_check" / "check.sh"
SHIM_M = ROOT / "anecy" / "objc" / "ane_shim.m"
SHIM_H = ROOT / "anecy" / "objc" / "ane_shim.h"

INSTALL_HINT = "apt-get update && apt-get install -y clang"


def _require(tool, hint):
    return require_tool(tool, hint, "the Objective-C shim is type-checked with it")


def _check(path):
    _require("clang", INSTALL_HINT)
    return subprocess.run(["bash", str(CHECK), str(path)], capture_output=True, text=True,
                          timeout=300)


def test_shim_passes_arc_and_type_check():
    result = _check(SHIM_M)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "objc_check: OK" in result.stdout


def test_missing_clang_fails_with_install_hint(tmp_path):
    result = subprocess.run(
        ["bash", str(CHECK)], capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", "CLANG": str(tmp_path / "no-such-clang")},
    )
    assert result.returncode != 0
    assert "apt-get install -y clang" in result.stderr


# (name, accepted twin, rejected variant, diagnostic the rejection must carry). Each is
# appended as a function at the end of a copy of ane_shim.m, where the shim's structs and
# includes are in scope.
CASES = [
    (
        "arc-object-into-c-struct-field",
        "void t(anecy_ane_kernel *k, id obj) { k->model = CFBridgingRetain(obj); }",
        "void t(anecy_ane_kernel *k, id obj) { k->model = obj; }",
        "requires a bridged cast",
    ),
    (
        "arc-explicit-retain",
        "void t(id obj) { (void)[obj description]; }",
        "void t(id obj) { (void)[obj retain]; }",
        "ARC forbids explicit message send of 'retain'",
    ),
    (
        "arc-c-pointer-to-object-without-bridge",
        "id t(anecy_ane_kernel *k) { return (__bridge id)k->model; }",
        "id t(anecy_ane_kernel *k) { return (id)k->model; }",
        "requires a bridged cast",
    ),
    (
        "type-wrong-argument",
        "size_t t(anecy_ane_surface *s) { return IOSurfaceGetAllocSize(s->surface); }",
        "size_t t(anecy_ane_surface *s) { return IOSurfaceGetAllocSize(s); }",
        "incompatible pointer types",
    ),
    (
        "type-undeclared-selector",
        "BOOL t(NSString *p) { return [[NSFileManager defaultManager] "
        "removeItemAtPath:p error:NULL]; }",
        "BOOL t(NSString *p) { return [[NSFileManager defaultManager] removeItemAtPath:p]; }",
        "no visible @interface",
    ),
    (
        "type-nil-for-nonnull",
        'NSString *t(NSString *p) { return [p stringByAppendingPathComponent:@"x"]; }',
        "NSString *t(NSString *p) { return [p stringByAppendingPathComponent:nil]; }",
        "null passed to a callee that requires a non-null argument",
    ),
]


def _variant(tmp_path, name, snippet):
    prototype = snippet.split("{", 1)[0].rstrip() + ";"
    path = tmp_path / f"{name}.m"
    path.write_text(SHIM_M.read_text() + f"\n{prototype}\n{snippet}\n")
    return path


@pytest.mark.parametrize("name,good,bad,diagnostic", CASES, ids=[c[0] for c in CASES])
def test_check_rejects_arc_and_type_errors(tmp_path, name, good, bad, diagnostic):
    accepted = _check(_variant(tmp_path, name + "-good", good))
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    rejected = _check(_variant(tmp_path, name + "-bad", bad))
    assert rejected.returncode != 0, f"clang accepted {bad!r}"
    assert "error:" in rejected.stderr
    assert diagnostic in rejected.stderr, rejected.stderr


def test_check_rejects_shim_built_without_arc(tmp_path):
    # The ARC-only code (bridge casts, CFBridgingRelease) must not build in manual
    # retain/release mode.
    _require("clang", INSTALL_HINT)
    result = subprocess.run(
        ["clang", "-fsyntax-only", "-x", "objective-c", "-fobjc-runtime=macosx-15.0",
         "-isystem", str(CHECK.parent / "sdk"), "-I", str(SHIM_H.parent), str(SHIM_M)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0
    assert "must be compiled with -fobjc-arc" in result.stderr


@pytest.mark.parametrize("compiler,language,std", [("cc", "c", "c99"), ("c++", "c++", "c++11")])
def test_header_is_plain_c_and_cxx(tmp_path, compiler, language, std):
    _require(compiler, "apt-get update && apt-get install -y build-essential")
    flags = ["-fsyntax-only", "-x", language, f"-std={std}", "-pedantic", "-Wall", "-Wextra",
             "-Werror"]
    alone = subprocess.run([compiler, *flags, str(SHIM_H)], capture_output=True, text=True,
                           timeout=120)
    assert alone.returncode == 0, alone.stderr
    # Used as a caller would: every declaration type-checks against a real call.
    use = tmp_path / ("use." + ("c" if language == "c" else "cpp"))
    use.write_text(
        '#include "ane_shim.h"\n'
        "int use(void);\n"
        "int use(void) {\n"
        "    char err[256];\n"
        "    anecy_ane_blob blob = {\"@model_path/weights/mask.bin\", 0, 0};\n"
        "    anecy_ane_kernel *k = anecy_ane_compile(\"program(1.3)\", &blob, 1, err, "
        "sizeof err);\n"
        "    anecy_ane_surface *in = anecy_ane_surface_create(64, err, sizeof err);\n"
        "    anecy_ane_surface *out = anecy_ane_surface_create(64, err, sizeof err);\n"
        "    void *p = anecy_ane_surface_lock(in);\n"
        "    anecy_ane_surface_unlock(in);\n"
        "    anecy_ane_request *r = anecy_ane_request_create(k, in, out, err, sizeof err);\n"
        "    int rc = anecy_ane_evaluate(r, err, sizeof err) + "
        "anecy_ane_available(err, sizeof err)\n"
        "             + anecy_ane_compile_count() + (int)anecy_ane_surface_bytes(out) + (p != 0)\n"
        "             + (int)ANECY_ANE_QOS;\n"
        "    anecy_ane_request_free(r);\n"
        "    anecy_ane_surface_free(in);\n"
        "    anecy_ane_surface_free(out);\n"
        "    anecy_ane_kernel_free(k);\n"
        "    return rc;\n"
        "}\n"
    )
    used = subprocess.run([compiler, *flags, "-I", str(SHIM_H.parent), str(use)],
                          capture_output=True, text=True, timeout=120)
    assert used.returncode == 0, used.stderr


def _code_tokens(text):
    text = re.sub(r"/\*.*?\*/", " ", text, flags=re.S)
    text = re.sub(r"//[^\n]*", " ", text)
    return text


def test_header_has_no_objective_c_types():
    code = _code_tokens(SHIM_H.read_text())
    assert "@" not in code
    assert "#import" not in code
    identifiers = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", code))
    objc_words = {"id", "Class", "SEL", "BOOL", "YES", "NO", "nil", "Nil", "IMP", "instancetype",
                  "__bridge", "__bridge_retained", "__bridge_transfer", "__strong", "__weak",
                  "__autoreleasing", "__unsafe_unretained", "__OBJC__"}
    assert not identifiers & objc_words, identifiers & objc_words
    framework = {w for w in identifiers
                 if re.match(r"(NS|CF|IOSurface|kIOSurface|objc_|_ANE|dispatch_)", w)}
    assert not framework, framework
    includes = re.findall(r"#\s*include\s*[<\"]([^>\"]+)[>\"]", code)
    assert includes == ["stddef.h"], includes
