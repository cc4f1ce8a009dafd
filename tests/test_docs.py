"""Every ```python example in README.md and docs/*.md runs (examples in docs are part of the suite)."""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def _examples():
    for f in FILES:
        for i, m in enumerate(BLOCK.finditer(f.read_text())):
            yield pytest.param(m.group(1), id=f"{f.relative_to(ROOT)}#{i}")


@pytest.mark.parametrize("code", list(_examples()))
def test_doc_example_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<doc example>", "exec"), {"__name__": "__doc_example__"})


def test_docs_have_examples():
    assert any(True for _ in _examples()), "no ```python examples found in README.md or docs/"
