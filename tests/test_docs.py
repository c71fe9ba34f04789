"""The documents agree with the code: the architecture document's kernel table with
anecy.mil.KERNELS, its section references with its headings, and the README's test command
with what .ci/run runs."""
import re
import runpy
import subprocess
from pathlib import Path

from conftest import require_tool

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"


def test_kernel_table_is_generated_from_the_kernel_table_in_code():
    tool = runpy.run_path(str(ROOT / "tools" / "kernel_table.py"))
    table = tool["table"]()
    assert table.count("\n") == 2 + 10       # header, rule, one row per kernel
    assert tool["documented"]() == table, \
        "docs/ARCHITECTURE.md's kernel table is stale: run python tools/kernel_table.py --write"


def test_section_references_name_existing_sections():
    headings = dict(re.findall(r"^## (\d+)\. (.+)$", ARCHITECTURE.read_text(), re.M))
    assert len(headings) >= 10
    cited = []
    sources = [ROOT / "README.md", *ROOT.glob("*.py"),
               *(p for d in ("anecy", "tests", "bench", "tools", "docs", ".ci")
                 for p in (ROOT / d).rglob("*") if p.is_file())]
    for path in sources:
        if path.suffix not in (".py", ".pyx", ".pxd", ".h", ".m", ".md", ".sh", ""):
            continue
        text = path.read_text(errors="replace")
        # "docs/ARCHITECTURE.md, section 4 (The ten kernels)": the title may wrap
        for num, title in re.findall(r"ARCHITECTURE\.md,?\s+(?:#\s*)?section\s+(\d+)"
                                     r"(?:\s+\(([^)]*)\))?", text):
            cited.append((path.name, num))
            assert num in headings, f"{path}: cites section {num}, which does not exist"
            if title:
                assert " ".join(title.split()) == headings[num], \
                    f"{path}: section {num} is '{headings[num]}', not '{title}'"
    assert cited, "no file cites a section of docs/ARCHITECTURE.md"


def readme_test_command():
    """The fenced block under the README's test-command marker."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- test command: [^>]*-->\n```bash\n(.*?)```\n<!-- end of test command -->",
                  text, re.S)
    assert m, "README.md has no marked test command block"
    return m.group(1)


def test_ci_runs_the_readme_test_command():
    bash = require_tool("bash", "apt-get install bash", ".ci/run is a bash script")
    shown = subprocess.run([bash, str(ROOT / ".ci" / "run"), "--print-test-command"],
                           capture_output=True, text=True, check=True).stdout
    command = readme_test_command()
    assert shown == command
    # one line a user pastes: a fresh virtual environment, the pinned CPU torch, the test
    # extras, the whole suite
    assert command.count("\n") == 1
    assert command.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "pip install torch==2.13.0" in command and command.strip().endswith("pytest -q tests")
