"""How a guard's result reads in a table: its key numbers and a row per altered module.

Kept apart from ``watch`` (which computes the merged report): renderers draw these through the
registry without knowing the guard.
"""

from __future__ import annotations

from fsdpqdiag.core.presentation import Column, DetailTable, Presentation

# The module and its first step are always shown; a narrow console drops the post bits first.
DETAIL_COLUMNS = (
    Column("module"),
    Column("first step"),
    Column("ranks", priority=2),
    Column("elements", priority=1),
    Column("post bits", priority=3),
)


def key_numbers(evidence: dict) -> str:
    """How a guard result reads: how many guarded weights were altered, from which optimizer step."""
    if "modules" not in evidence:
        return ""
    first = evidence.get("first_step")
    return (
        f"{evidence['altered_modules']} of {evidence['guarded']} guarded weights altered, first at step "
        f"{first if first is not None else '–'}; {evidence['checks']} checks over "
        f"{evidence['steps']} optimizer steps"
    )


def detail(evidence: dict) -> DetailTable | None:
    """A row per altered module."""
    modules = evidence.get("modules")
    if not modules:
        return None
    return DetailTable(DETAIL_COLUMNS, [_cells(m) for m in modules])


def _cells(module: dict) -> list[str]:
    return [
        module["module"],
        str(module["first_step"]),
        ", ".join(map(str, module["ranks"])),
        str(module["differing_elements"]),
        ", ".join(module["post_bit_patterns"]) or module.get("reason") or "–",
    ]


PRESENTATION = Presentation(
    key_numbers,
    detail,
    reads=frozenset({"modules", "first_step", "altered_modules", "guarded", "checks", "steps"}),
)
