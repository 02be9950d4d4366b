"""The ``sitecustomize`` that `safespawn-neutron` puts first on PYTHONPATH (agent side, Python 3.9+).

`safespawn wrappers install` copies this file to ``DIR/safespawn-neutron.d/sitecustomize.py``.
Python imports it at start-up in every process the launcher starts (unless run with -S, -I or -E).
It adds one import hook: when ``neutron.agent.linux.external_process`` has been executed, its
``ProcessManager`` is replaced by ``safespawn_neutron``'s class (from ``DIR``). Nothing else is
imported until Neutron itself is. An image's own ``sitecustomize`` still runs after this one.
"""

import importlib
import importlib.abc
import os
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any, Optional, Sequence

TARGET = "neutron.agent.linux.external_process"
HOOK_DIR = os.path.dirname(os.path.abspath(__file__))
WRAPPERS_DIR = os.path.dirname(HOOK_DIR)  # where safespawn_neutron.py and safespawn_client.py are


class _SwapLoader(importlib.abc.Loader):
    """Runs the real loader, then swaps the class in the freshly executed module."""

    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: ModuleSpec) -> Optional[ModuleType]:
        return self.inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.inner.exec_module(module)
        if WRAPPERS_DIR not in sys.path:
            sys.path.append(WRAPPERS_DIR)
        import safespawn_neutron

        safespawn_neutron.install(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_code, ... for tracebacks and pkgutil
        return getattr(self.inner, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Optional[Sequence[str]],
                  target: Optional[ModuleType] = None) -> Optional[ModuleSpec]:
        if name != TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _SwapLoader(spec.loader)
                return spec
        return None


def _chain_image_sitecustomize() -> None:
    """Run the sitecustomize that this one shadows, if the image has one. One that fails fails as
    it would without this hook: its exception reaches site.py, which prints "Error in
    sitecustomize" and carries on (the finder above is already in place)."""
    me = sys.modules.get("sitecustomize")
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HOOK_DIR]
    try:
        del sys.modules["sitecustomize"]
        try:
            importlib.import_module("sitecustomize")
        except ImportError as e:
            if e.name != "sitecustomize":
                raise  # the image's sitecustomize is there, and an import of its own failed
    finally:
        sys.path[:] = saved
        if me is not None:
            sys.modules["sitecustomize"] = me


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.insert(0, _Finder())
    _chain_image_sitecustomize()
