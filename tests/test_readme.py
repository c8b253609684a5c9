"""The README's Python examples run as written (in a scratch directory), so they never drift
from the code."""

import os
import re
import textwrap

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block in the README."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    blocks = []
    for m in re.finditer(r"^( *)```python\n(.*?)^ *```", text, flags=re.S | re.M):
        line = text[: m.start()].count("\n") + 1
        blocks.append((line, textwrap.dedent(m.group(2))))
    return blocks


def test_readme_has_python_examples():
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("line,code", python_blocks(), ids=lambda v: str(v)[:12])
def test_readme_example_runs(line, code, tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme"})
