"""The documents agree with the code: the architecture document's kernel table with
anecy.mil.KERNELS, and its section references with its headings."""
import re
import runpy
from pathlib import Path

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
    for path in ROOT.rglob("*"):
        if path.suffix not in (".py", ".pyx", ".pxd", ".md", ".sh") or ".venv" in path.parts:
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
