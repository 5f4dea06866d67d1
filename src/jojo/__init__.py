"""Jojo: build a language model from scratch, end to end.

The Python API (`jojo.LM`, `jojo.prepare`, `jojo.pretrain`, `jojo.finetune`, `jojo.JojoError`) is imported on
first use, so `import jojo` and `jojo --help` stay quick (torch is not loaded until a model is needed).
"""

__version__ = "0.1.0"

_API = {"LM", "Score", "prepare", "pretrain", "finetune", "PrepareResult"}


def __getattr__(name: str):
    if name in _API:
        from jojo import api

        return getattr(api, name)
    if name == "JojoError":
        from jojo.errors import JojoError

        return JojoError
    raise AttributeError(f"module 'jojo' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API) + ["JojoError"])
