"""bitsandbytes imported in a rank without TorchInductor, until something asks to compile.

bitsandbytes wraps its fallback kernels in ``torch.compile`` as it is imported
(``backends/default/ops.py``'s ``_try_torch_compile``; the Triton optimizer kernels).
``torch.compile`` imports TorchDynamo and Inductor when it wraps a function, not when it
compiles it: about 4 CPU-seconds in every rank, though the CPU and CUDA backends run kernels
of their own and a probe seldom reaches a compiled one. ``defer_compile_at_import`` makes
``torch.compile`` wrap lazily while, and only while, the bitsandbytes package is imported:
a wrapped function compiles on its first call, with the same function and options, exactly
as the eager wrapper would have then (a failure to compile raises at that call, where
bitsandbytes' own fallback catches it as it does a failed compilation). Nothing else of torch
or bitsandbytes changes, and the tool's processes alone do this: never a user's script.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.abc
import importlib.util
import sys
from collections.abc import Callable, Iterator
from typing import Any

PACKAGE = "bitsandbytes"


class CompileOnFirstCall:
    """What ``torch.compile(fn, **options)`` returns while bitsandbytes is imported."""

    def __init__(self, compile_: Callable, fn: Callable, options: dict[str, Any]):
        functools.update_wrapper(self, fn)
        self._compile, self._fn, self._options = compile_, fn, options
        self._compiled: Callable | None = None

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            self._compiled = self._compile(self._fn, **self._options)
        return self._compiled(*args, **kwargs)


@contextlib.contextmanager
def lazy_torch_compile() -> Iterator[None]:
    import torch

    eager = torch.compile

    def compile_on_first_call(model=None, **options):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: CompileOnFirstCall(eager, fn, options)
        return CompileOnFirstCall(eager, model, options)

    torch.compile = compile_on_first_call
    try:
        yield
    finally:
        torch.compile = eager


class _LazyCompileWhileImporting(importlib.abc.MetaPathFinder):
    """Finds bitsandbytes as the other finders do, and runs its package's import (every
    submodule its ``__init__`` imports) under ``lazy_torch_compile``. It stays until the
    package is imported: a check that bitsandbytes is installed (``find_spec``) first asks
    it too, and gets a spec that is never executed."""

    def __init__(self) -> None:
        self._searching = False

    def find_spec(self, name, path=None, target=None):
        if name != PACKAGE or self._searching:
            return None
        self._searching = True  # the other finders answer the search below
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._searching = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_lazily(module):
            with contextlib.suppress(ValueError):
                sys.meta_path.remove(self)  # imported once: the other finders answer from here on
            with lazy_torch_compile():
                exec_module(module)

        spec.loader.exec_module = exec_lazily
        return spec


def defer_compile_at_import() -> None:
    """In a rank (or the zygote ranks fork from), before anything imports bitsandbytes."""
    if PACKAGE in sys.modules or any(isinstance(f, _LazyCompileWhileImporting) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _LazyCompileWhileImporting())
