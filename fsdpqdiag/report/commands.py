"""What each command's report means: how its verdicts become an exit code and how the code reads.

A report names the command that wrote it (``Report.command``); this is where that name is
looked up, so that no reader branches on it. ``fix`` reads its verdicts as workarounds (its
unfixed reference row is expected to break where the bug reproduces), ``doctor`` its
preflight's capabilities; every other command reads its verdicts as findings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fsdpqdiag.core.verdict import VerdictKind

# Exit codes a command's results decide (report.model has the others).
EXIT_CLEAN = 0
EXIT_FOUND = 1
EXIT_PROBE_FAILED = 3
# The workaround name of fix's unfixed reference row.
UNFIXED = "none"


@dataclass(frozen=True)
class CommandKind:
    """What a command's report means: ``exit_code(report)``, what its codes 0 and 1 mean,
    whether its next steps suggest trying a workaround (not after ``fix`` itself), and
    whether its view ends with the conclusion (``doctor`` shows the preflight alone).
    Renderers key their views by it (``fsdpqdiag.render.views``)."""

    name: str
    exit_code: Callable[[Any], int]
    clean_meaning: str
    found_meaning: str
    suggests_fix: bool
    concludes: bool = True


def _findings_exit_code(report: Any) -> int:
    verdicts = {r.verdict for r in report.results}
    if verdicts & {VerdictKind.REPRODUCED, VerdictKind.CRASHED, VerdictKind.INCONCLUSIVE}:
        return EXIT_FOUND
    if verdicts & {VerdictKind.ERROR, VerdictKind.TIMEOUT, VerdictKind.UNSUPPORTED}:
        return EXIT_PROBE_FAILED
    return EXIT_CLEAN


def _workarounds_exit_code(report: Any) -> int:
    fixed = {r.verdict for r in report.results if r.config.get("workaround") != UNFIXED}
    # A workaround whose checkpoint loses state cannot be used as it is.
    if fixed & {VerdictKind.NOT_VERIFIED, VerdictKind.STATE_LOST}:
        return EXIT_FOUND
    failed = {VerdictKind.ERROR, VerdictKind.TIMEOUT, VerdictKind.CRASHED, VerdictKind.UNSUPPORTED}
    return EXIT_PROBE_FAILED if fixed & failed else EXIT_CLEAN


def _capabilities_exit_code(report: Any) -> int:
    """Every capability of every preflight held, or a probe relying on one would be UNSUPPORTED."""
    checks = report.preflight
    ok = all(c["ok"] for checked in checks for c in checked.get("capabilities", []))
    return EXIT_CLEAN if ok else EXIT_PROBE_FAILED


def _findings(name: str) -> CommandKind:
    return CommandKind(
        name, _findings_exit_code, "nothing reproduced", "something was found", suggests_fix=True
    )


REPRODUCE = _findings("reproduce")
LOCALIZE = _findings("localize")
FORENSICS = _findings("forensics")
MATRIX = _findings("matrix")
WATCH = _findings("watch")
FIX = CommandKind(
    "fix",
    _workarounds_exit_code,
    "every workaround verified, or none needed",
    "a workaround falls short",
    suggests_fix=False,
)
DOCTOR = CommandKind(
    "doctor",
    _capabilities_exit_code,
    "every capability ok",
    "a capability failed",
    suggests_fix=False,
    concludes=False,
)
COMMANDS = {kind.name: kind for kind in (REPRODUCE, LOCALIZE, FIX, FORENSICS, MATRIX, WATCH, DOCTOR)}


def kind_of(command: str) -> CommandKind:
    """The descriptor of the command a report names. A command this version does not know
    reads as ``reproduce``: findings, in the table of probe results."""
    return COMMANDS.get(command, REPRODUCE)
