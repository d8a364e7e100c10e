"""Every Python block of README.md and docs/*.md runs, so no example rots.

The blocks of one file run in order in one namespace (a later block may use what an earlier one
defined), each file in a fresh namespace. A block that raises fails the test for its file.
"""

from __future__ import annotations

import re
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(path: Path) -> list[str]:
    """The fenced ```python blocks of a Markdown file, in order."""
    return _BLOCK.findall(path.read_text())


def test_the_documents_have_python_blocks():
    """The collector finds the blocks (a changed fence style must not turn the test vacuous)."""
    assert python_blocks(ROOT / "README.md")
    assert python_blocks(ROOT / "docs" / "custom_layers.md")


@pytest.mark.parametrize(
    "path",
    [p for p in DOCUMENTS if python_blocks(p)],
    ids=lambda p: str(p.relative_to(ROOT)),
)
@pytest.mark.slow
def test_python_blocks_run(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files an example writes land in a temporary directory
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for i, block in enumerate(python_blocks(path)):
        code = compile(block, f"{path.relative_to(ROOT)} [block {i + 1}]", "exec")
        exec(code, namespace)
    keras.config.set_dtype_policy("float32")
