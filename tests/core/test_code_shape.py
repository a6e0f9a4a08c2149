"""No module over 400 lines, no function over 80, so that each reads in one sitting; no stray
module at the top of the package."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fsdpqdiag"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MODULES = [(path.relative_to(PACKAGE).as_posix(), path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))]


@pytest.mark.parametrize(("relative", "source"), MODULES, ids=[relative for relative, _ in MODULES])
def test_module_and_function_length(relative, source):
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{relative} is over {MAX_MODULE_LINES} lines"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{relative}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


# The top level holds only the entry points and the composition root: everything else lives in
# the folder of its concern, so the tree shows the architecture.
TOP_LEVEL_MODULES = {"__init__.py", "__main__.py", "envvars.py", "errors.py", "tasks.py"}


def test_no_module_at_the_top_level_outside_the_allowed_few():
    stray = sorted(path.name for path in PACKAGE.glob("*.py") if path.name not in TOP_LEVEL_MODULES)
    assert not stray, f"modules at the top of fsdpqdiag/ that belong in a subpackage: {stray}"


def test_every_environment_variable_is_spelled_only_in_envvars():
    # One place names them: a variable renamed there cannot be left behind in a reader or a writer.
    spelled = [
        f"{path.relative_to(PACKAGE)}:{number}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "envvars.py" or path.parent != PACKAGE
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "FSDPQDIAG_" in line
    ]
    assert not spelled, f"FSDPQDIAG_ spelled outside fsdpqdiag/envvars.py: {spelled}"
