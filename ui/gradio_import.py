"""Importing Gradio without its type-stub writer: ~2-3 s off the demo's start-up.

As each Gradio component class is defined, ``gradio.component_meta`` re-derives the class's type
stub from its source with ``ast`` and rewrites the ``.pyi`` file beside it when they differ
(``create_or_modify_pyi``). That keeps the stubs of Gradio's own repository current while its
developers work; an installed Gradio ships them already, and nothing reads them at run time. It still
runs on every ``import gradio``, for ~80 components: on the 2-core dev machine ``import gradio`` takes
4.9-6.2 s with it and 2.9-3.0 s without (Gradio 6.31), and a later start of the demo 9.8 s with it,
7.2 s without (benchmarks/RESULTS.md).

``skip_stub_writer`` installs an import hook that swaps the function for a no-op the moment its
module has run, before the first component class is built. Where Gradio is already imported, or no
longer has the function, the hook changes nothing and Gradio behaves as it always does.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from types import ModuleType

_MODULE = "gradio.component_meta"
_FUNCTION = "create_or_modify_pyi"


def _no_stub(*args, **kwargs) -> None:
    """Stands in for Gradio's stub writer: leaves the installed ``.pyi`` files as they are."""


class _StubWriterSkipper(importlib.abc.MetaPathFinder):
    """Finds ``gradio.component_meta`` as the normal path finder does, then wraps its loader so that
    the stub writer is replaced right after the module body runs."""

    def find_spec(self, name, path, target=None):
        if name != _MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            if hasattr(module, _FUNCTION):
                setattr(module, _FUNCTION, _no_stub)

        spec.loader.exec_module = exec_module
        return spec


def skip_stub_writer() -> None:
    """Install the hook (once) unless Gradio's component classes are already built."""
    if _MODULE in sys.modules or any(isinstance(f, _StubWriterSkipper) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _StubWriterSkipper())
