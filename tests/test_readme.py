"""Every ```python block of the READMEs is a complete program: each runs to completion in a
fresh interpreter (from an empty working directory, one torch thread) and checks what it shows
(a training snippet asserts that its loss decreased). Blocks that compile with torch.compile
are slow tests."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("ekfac_triton/*/README.md")),
           "bench/README.md", "tests/README.md"]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def python_blocks(readme: str) -> list[tuple[int, str]]:
    """``(line, code)`` of each ```python block of ``readme`` (line: where the block starts)."""
    text = (ROOT / readme).read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def _params() -> list:
    params = []
    for readme in READMES:
        for line, code in python_blocks(readme):
            marks = [pytest.mark.slow] if "torch.compile" in code or "compile_step" in code else []
            params.append(pytest.param(readme, line, code, id=f"{readme}:{line}", marks=marks))
    return params


def test_the_readmes_have_python_blocks():
    """The extraction finds the blocks (a changed fence would otherwise silently test nothing)."""
    assert len(python_blocks("README.md")) >= 6
    assert len(python_blocks("ekfac_triton/pinn/README.md")) >= 2


@pytest.mark.parametrize("readme, line, code", _params())
def test_readme_block_runs(readme, line, code, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, (f"{readme}, the block at line {line} failed:\n--- stdout\n{result.stdout}"
                                    f"\n--- stderr\n{result.stderr[-4000:]}")


def markdown_table(text: str, first_header: str) -> list[dict[str, str]]:
    """The rows (header -> cell) of the first markdown table of ``text`` whose first header cell is
    ``first_header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_readme_demo_table_is_the_committed_one():
    """The demo table of README.md is ``bench/results/demo/cpu/table.md`` (a subset of its columns,
    every cell as committed)."""
    readme = markdown_table((ROOT / "README.md").read_text(encoding="utf-8"), "optimizer")
    committed = markdown_table((ROOT / "bench/results/demo/cpu/table.md").read_text(encoding="utf-8"), "optimizer")
    assert [r["optimizer"] for r in readme] == [r["optimizer"] for r in committed]
    for ours, theirs in zip(readme, committed):
        for column, cell in ours.items():
            assert column in theirs, f"README demo table column {column!r} is not in table.md"
            assert cell == theirs[column], f"{ours['optimizer']} {column}: README {cell!r}, table.md {theirs[column]!r}"
