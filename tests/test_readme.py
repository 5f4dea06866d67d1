"""Every Python example in the README runs, as written, in order, in a fresh working directory (so the examples
cannot drift from the API). Shell commands are not run here; the artefacts a Python example reads from an earlier
shell command (an exported transformers folder) are made first, with the same library call the command makes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_examples():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2 and any("jojo.LM.load" in b for b in blocks)


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    monkeypatch.chdir(tmp_path)
    for i, block in enumerate(python_blocks(README.read_text())):
        if "runs/tiny-hf" in block:  # README: `jojo export hf runs/tiny runs/tiny-hf`, of the run made above
            from jojo.export.hf import export_hf

            export_hf("runs/py-tiny", "runs/tiny-hf")
        namespace: dict = {"__name__": f"readme_block_{i}"}
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Score(bits=" in out
