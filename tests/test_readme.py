"""Every Python example in the README runs, as written, in order, in a fresh working directory (so the examples
cannot drift from the API). Shell commands are not run here; the artefacts a Python example reads from an earlier
shell command (an exported transformers folder) are made first, with the same library call the command makes."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@contextlib.contextmanager
def serving(run: Path, name: str, port: int):
    """`jojo serve RUN --model-name NAME --port PORT` in a child process, until the block is done."""
    import json
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "jojo.cli", "serve", str(run), "--port", str(port),
                             "--model-name", name, "--device", "cpu"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200 and json.loads(r.read()).get("status") == "ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"jojo serve did not start: {proc.stderr.read() if proc.stderr else ''}")
            time.sleep(0.5)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=30)


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
        if "127.0.0.1:8000" in block:  # README: `jojo serve runs/chat`, here the chat model made above
            with serving(tmp_path / "runs" / "py-chat", "chat", 8000):
                exec(compile(block, f"README.md python block {i}", "exec"), namespace)
            continue
        exec(compile(block, f"README.md python block {i}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "Score(bits=" in out
