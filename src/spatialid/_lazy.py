"""Lazy public names for packages whose members import torch, diffusers or Gradio.

``import spatialid`` and the CLI's argument parsing must stay fast, so packages list their public
names with the module that defines each, and the module is imported on first attribute access
(PEP 562). One helper serves every package so the behaviour (caching, error text) is the same.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str], eager: Iterable[str] = ()
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """Build ``(__getattr__, __dir__, __all__)`` for ``package``.

    Args:
        package: the package's ``__name__``.
        names: public name -> module that defines it.
        eager: names the package already defines itself (listed in ``__all__`` too).
    """
    public = [*eager, *names]

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # later look-ups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(public)

    return __getattr__, __dir__, public
