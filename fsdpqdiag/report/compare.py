"""Compare two reports result by result, to the last bit (#1945's cross-host check).

Results are matched by what was run (command, probe, world size, device, injected fault,
and the cell or workaround); for each pair every evidence leaf is compared exactly. The
environments are reported side by side but never make reports "different": comparing
two stacks is the point.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fsdpqdiag.report.model import Report

# Leaves that measure the run, not the stack: never part of "identical".
# A crashed rank's python_stack names the files of one install (paths, line numbers).
VOLATILE = {
    "duration_s",
    "seconds",
    "step_seconds_fsdp",
    "log_tail",
    "python_stack",
    "created",
    "device",
}


# The conclusions, in the order a reader is told them, with the exit code of each.
IDENTICAL = "identical"
NUMBERS_DIFFER = "verdicts identical, numbers differ"
CONFIGURATIONS_DIFFER = "verdicts identical, configurations differ"
VERDICTS_DIFFER = "verdicts differ"
EXIT_NUMBERS_DIFFER = 4
CONCLUSION_EXIT = {
    IDENTICAL: 0,
    NUMBERS_DIFFER: EXIT_NUMBERS_DIFFER,
    CONFIGURATIONS_DIFFER: 1,
    VERDICTS_DIFFER: 1,
}
# What a run was asked (not what it measured): a difference here makes the runs answer
# different questions, whose numbers are expected to differ.
ASKED = ("config", "backend")


class Incomparable(ValueError):
    """Two reports of different commands or schemas: no answer but 'cannot compare'."""


@dataclass
class Comparison:
    identical: bool
    matched: int
    differences: list[dict[str, Any]] = field(default_factory=list)
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    environment: list[dict[str, Any]] = field(default_factory=list)
    conclusion: str = IDENTICAL

    @property
    def exit_code(self) -> int:
        return CONCLUSION_EXIT[self.conclusion]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        """The differences of one kind: ``verdict``, ``asked`` (config, backend) or ``evidence``."""
        return [d for d in self.differences if _kind(d["path"]) == kind]


def _kind(path: str) -> str:
    head = path.split(".", 1)[0].split("[", 1)[0]
    return "verdict" if head == "verdict" else "asked" if head in ASKED else "evidence"


def _conclusion(differences: list[dict[str, Any]], only_a: list[str], only_b: list[str]) -> str:
    kinds = {_kind(d["path"]) for d in differences}
    if "verdict" in kinds or only_a or only_b:
        return VERDICTS_DIFFER
    if "asked" in kinds:
        return CONFIGURATIONS_DIFFER
    return NUMBERS_DIFFER if kinds else IDENTICAL


def result_key(result) -> str:
    """What a result answers: the key that pairs it with its counterpart in another report."""
    config = result.config
    selector = config.get("cell", {}).get("name") or config.get("workaround") or ""
    target = config.get("target", "")
    return "/".join(
        str(part)
        for part in (result.probe, selector, target, f"ws={result.world_size}", result.injected or "")
        if part != ""
    )


def _walk(a: Any, b: Any, path: str, out: list[dict[str, Any]]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key in VOLATILE:
                continue
            if key not in a or key not in b:
                out.append(
                    {"path": f"{path}.{key}", "a": a.get(key, "<absent>"), "b": b.get(key, "<absent>")}
                )
            else:
                _walk(a[key], b[key], f"{path}.{key}", out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, f"{path}[{index}]", out)
    elif a != b or type(a) is not type(b):
        out.append({"path": path, "a": a, "b": b})


def compare(a: Report, b: Report) -> Comparison:
    if a.command != b.command:
        raise Incomparable(f"reports of different commands: {a.command!r} vs {b.command!r}")
    left = {result_key(r): r for r in a.results}
    right = {result_key(r): r for r in b.results}
    differences: list[dict[str, Any]] = []
    for key in sorted(set(left) & set(right)):
        ra, rb = left[key], right[key]
        found: list[dict[str, Any]] = []
        for name in ("verdict", "config", "backend"):
            _walk(getattr(ra, name), getattr(rb, name), name, found)
        _walk(ra.evidence, rb.evidence, "evidence", found)
        differences += [{"result": key, **item} for item in found]
    environment: list[dict[str, Any]] = []
    _walk(a.env, b.env, "env", environment)
    only_a, only_b = sorted(set(left) - set(right)), sorted(set(right) - set(left))
    return Comparison(
        identical=not differences and not only_a and not only_b,
        matched=len(set(left) & set(right)),
        differences=differences,
        only_in_a=only_a,
        only_in_b=only_b,
        environment=environment,
        conclusion=_conclusion(differences, only_a, only_b),
    )
