"""The conftest helper for outside requirements: a skip with a reason, a failure under CI."""
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

NEEDS_MISSING_TOOL = '''
from conftest import require_tool

def test_needs_tool():
    require_tool("no-such-tool-anecy", "apt-get install no-such-tool", "for a check")
'''


def _pytest(tmp_path, ci):
    (tmp_path / "conftest.py").write_text((TESTS / "conftest.py").read_text())
    (tmp_path / "test_needs.py").write_text(NEEDS_MISSING_TOOL)
    env = {"PATH": "/usr/bin:/bin", "CI": "true" if ci else ""}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           str(tmp_path)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)


def test_missing_requirement_skips_with_how_to_get_it(tmp_path):
    r = _pytest(tmp_path, ci=False)
    assert r.returncode == 0, r.stdout
    assert "1 skipped" in r.stdout and "apt-get install no-such-tool" in r.stdout


def test_missing_requirement_fails_under_ci(tmp_path):
    r = _pytest(tmp_path, ci=True)
    assert r.returncode == 1, r.stdout
    assert "1 failed" in r.stdout and "CI=true" in r.stdout
