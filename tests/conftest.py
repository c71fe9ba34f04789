"""What the tests need from outside the repository, asked for in one way.

Some tests need a system tool (clang for the Objective-C shim check) or test data that is
kept beside the repository, not in it (the Llama-2 tokenizer in ``../shared``). When such a
thing is missing, the test is skipped with a reason that says how to get it, except under CI
(``CI=true``), where it fails: CI provides everything, so a skip there would hide a check.
"""
import os
import shutil
import sys
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")

# Test data kept beside the repository (never inside it).
SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def require(available: bool, what: str, how: str) -> None:
    """Skip (or, under CI, fail) the calling test unless ``available``.

    ``what`` names the missing thing and why the test needs it; ``how`` says how to get it."""
    if available:
        return
    message = f"{what} is missing: {how}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


def require_tool(name: str, install: str, why: str) -> str:
    """The path of system tool ``name``; skips/fails the test if it is not installed."""
    path = shutil.which(name)
    require(path is not None, f"'{name}' ({why})", f"run `{install}`")
    return path


def require_shared(*parts: str, why: str) -> Path:
    """A test data file under ``../shared``; skips/fails the test if it is not there."""
    path = SHARED.joinpath(*parts)
    require(path.is_file(), f"{path} ({why})",
            "put the project's shared test data beside the repository, as ../shared")
    return path


def require_module(name: str, install: str, why: str):
    """Import and return module ``name``; skips/fails the test if it cannot be imported."""
    try:
        return __import__(name)
    except ImportError:
        require(False, f"the Python package '{name}' ({why})", f"run `{install}`")


@pytest.fixture(autouse=True)
def _fresh_compile_budget():
    """Each test starts with the ANE compile budget of a new process: the stand-in
    executors count against it as the real compiler would (anecy.ane_health)."""
    health = sys.modules.get("anecy.ane_health")
    if health is not None:
        health._SPENT[0] = 0
    yield
