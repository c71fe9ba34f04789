"""The documents agree with the code: the architecture document's kernel table with
anecy.mil.KERNELS."""
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_table_is_generated_from_the_kernel_table_in_code():
    tool = runpy.run_path(str(ROOT / "tools" / "kernel_table.py"))
    table = tool["table"]()
    assert table.count("\n") == 2 + 10       # header, rule, one row per kernel
    assert tool["documented"]() == table, \
        "docs/ARCHITECTURE.md's kernel table is stale: run python tools/kernel_table.py --write"
