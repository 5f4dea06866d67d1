import importlib
import pkgutil

import jojo


def test_every_module_imports():
    names = [m.name for m in pkgutil.walk_packages(jojo.__path__, "jojo.")]
    assert "jojo.model" in names and "jojo.cli" in names
    for name in names:
        importlib.import_module(name)
