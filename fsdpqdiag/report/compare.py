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


def _key(result) -> str:
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
    left = {_key(r): r for r in a.results}
    right = {_key(r): r for r in b.results}
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
    )
