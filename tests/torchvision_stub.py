"""A stand-in for torchvision so that timm imports next to the CPU torch build.

The only torchvision wheels on PyPI link against the CUDA torch libraries, so with the CPU
build ``import torchvision`` fails (``operator torchvision::nms does not exist``), and timm
imports it at import time: ``FrozenBatchNorm2d`` for its norm-layer factory and the transforms
and datasets of ``timm.data``.  Building an architecture with random weights uses none of
them, so every ``torchvision.*`` module here is empty and every attribute is an inert
placeholder class.  Installed only when the real package does not import
(:func:`install_if_missing`); a model that really needed torchvision would fail loudly when it
called a placeholder.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any


class _Placeholder(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__name__}.{name}")

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"torchvision is stubbed (tests/torchvision_stub.py): {cls.__name__} is not available")


def _placeholder(name: str) -> type:
    return _Placeholder(name, (), {})


class _Module(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{self.__name__}.{name}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _Module(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        return None


def install_if_missing() -> None:
    """Make ``import torchvision`` succeed, with the real package if it imports."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    try:
        import torchvision  # noqa: F401
    except (ImportError, RuntimeError, OSError):
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]  # a half-imported real package
        sys.meta_path.insert(0, _Finder())
