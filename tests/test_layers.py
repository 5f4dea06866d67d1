"""Layers point one way, low to high (README's Layout section states the order):

    errors -> config, device -> tokenizer -> data -> model -> checkpoint -> infer -> eval -> train
        -> serve, export -> api -> quickstart -> commands -> cli

Every `jojo` import of every module, function-local ones included, must point to the same layer or a lower one;
within a layer, a package may import itself but not a sibling package of the same rank (serve and export stay
independent). The test reads the source with `ast`, so it sees imports that never run in the tests."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "jojo"

LAYERS = [
    {"errors"},
    {"config", "device"},
    {"tokenizer"},
    {"data"},
    {"model"},
    {"checkpoint"},
    {"infer"},
    {"eval"},
    {"train"},
    {"serve", "export"},
    {"api"},
    {"quickstart"},
    {"commands"},
    {"cli", "__init__", "__main__"},
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def unit(module: str) -> str:
    """jojo.train.loop -> train; jojo.model -> model; jojo -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, src: Path = SRC) -> str:
    rel = path.relative_to(src.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def jojo_imports(path: Path, src: Path = SRC) -> list[tuple[int, str]]:
    """(line, imported jojo module) for every import in the file; `from jojo import x` names jojo.x."""
    tree = ast.parse(path.read_text(), str(path))
    here = module_name(path, src)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "jojo"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "jojo":
                continue
            if base == "jojo":
                found += [(node.lineno, f"jojo.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, base))
    return found


def upward_edges(src: Path = SRC) -> list[str]:
    bad = []
    for path in sorted(src.rglob("*.py")):
        here = unit(module_name(path, src))
        if here not in RANK:
            bad.append(f"{path.relative_to(src)}: module '{here}' has no layer; add it to LAYERS and the README")
            continue
        for line, target in jojo_imports(path, src):
            there = unit(target)
            if there == here or there == "__init__":
                continue
            if there not in RANK:
                bad.append(f"{path.relative_to(src)}:{line}: imports {target}, which has no layer")
            elif RANK[there] > RANK[here] or (RANK[there] == RANK[here] and there != here):
                bad.append(f"{path.relative_to(src)}:{line}: {here} (layer {RANK[here]}) imports {target} "
                           f"(layer {RANK[there]})")  # fmt: skip
    return bad


def test_every_import_points_down():
    assert upward_edges() == []


def test_the_check_catches_an_upward_import(tmp_path):
    """A copy of the package with one function-local upward import added (model -> infer) must fail."""
    import shutil

    copy = tmp_path / "jojo"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    model = copy / "model.py"
    model.write_text(model.read_text() + "\n\ndef _sneaky():\n    from jojo.infer.engine import generate\n")
    bad = upward_edges(copy)
    assert len(bad) == 1 and "model.py" in bad[0] and "jojo.infer.engine" in bad[0]
    # and a sibling of the same rank: export importing serve
    (copy / "serve").mkdir(exist_ok=True)
    (copy / "serve" / "__init__.py").write_text("")
    (copy / "export" / "x.py").write_text("from jojo import serve\n")
    assert any("export/x.py" in b for b in upward_edges(copy))


@pytest.mark.parametrize("name", ["jojo.infer.engine", "jojo.eval.lm", "jojo.train.loop"])
def test_unit_names(name):
    assert unit(name) == name.split(".")[1]
