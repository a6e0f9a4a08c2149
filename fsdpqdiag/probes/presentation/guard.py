"""How a guard result (`fsdpqdiag watch`, `fsdpqdiag.guard`) reads: how many guarded weights
were altered and from which optimizer step, and a row per altered module."""

from __future__ import annotations

from fsdpqdiag.presentation import Column, DetailTable

COLUMNS = (
    Column("module"),
    Column("first step"),
    Column("ranks", priority=2),
    Column("elements", priority=1),
    Column("post bits", priority=3),
)


def key_numbers(evidence: dict) -> str:
    if "modules" not in evidence:
        return ""
    first = evidence.get("first_step")
    return (
        f"{evidence['altered_modules']} of {evidence['guarded']} guarded weights altered, first at step "
        f"{first if first is not None else '–'}; {evidence['checks']} checks over "
        f"{evidence['steps']} optimizer steps"
    )


def detail(evidence: dict) -> DetailTable | None:
    modules = evidence.get("modules")
    if not modules:
        return None
    return DetailTable(COLUMNS, [_cells(m) for m in modules])


def _cells(module: dict) -> list[str]:
    return [
        module["module"],
        str(module["first_step"]),
        ", ".join(map(str, module["ranks"])),
        str(module["differing_elements"]),
        ", ".join(module["post_bit_patterns"]) or module.get("reason") or "–",
    ]
