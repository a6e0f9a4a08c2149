"""The tool's processes import bitsandbytes without TorchInductor; what runs is unchanged."""

import subprocess
import sys

import pytest

from fsdpqdiag.stack.bnb_import import CompileOnFirstCall
from tests.support import ROOT

_IMPORT = """
import importlib.util
import sys
from fsdpqdiag.stack import bnb_import
bnb_import.defer_compile_at_import()
# as the CLI checks that it is installed before anything imports it
assert importlib.util.find_spec("bitsandbytes") is not None
import torch
eager = torch.compile
import bitsandbytes
assert torch.compile is eager, "torch.compile is restored once bitsandbytes is imported"
print(sorted(m for m in ("torch._inductor.compile_fx", "bitsandbytes") if m in sys.modules))
"""


def test_bitsandbytes_imports_without_inductor_and_torch_compile_is_restored():
    done = subprocess.run(
        [sys.executable, "-c", _IMPORT], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[-2] == "['bitsandbytes']"


def test_a_deferred_function_compiles_once_on_first_call_with_its_options():
    compiled = []

    def compile_(fn, **options):
        compiled.append(options)
        return lambda *args: ("compiled", fn(*args))

    def double(x):
        """Doubles."""
        return 2 * x

    deferred = CompileOnFirstCall(compile_, double, {"dynamic": False})
    assert compiled == [] and deferred.__name__ == "double" and deferred.__doc__ == "Doubles."
    assert deferred(3) == ("compiled", 6) and deferred(4) == ("compiled", 8)
    assert compiled == [{"dynamic": False}]


def test_a_failed_compilation_raises_at_the_call_where_bitsandbytes_falls_back():
    def compile_(fn, **options):
        raise RuntimeError("no compiler")

    deferred = CompileOnFirstCall(compile_, lambda x: x, {})
    with pytest.raises(RuntimeError, match="no compiler"):
        deferred(1)
