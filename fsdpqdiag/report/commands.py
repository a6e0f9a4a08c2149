"""What each command's report means: how its verdicts become an exit code and how the code reads.

A report names the command that wrote it (``Report.command``); this is where that name is
looked up, so that no reader branches on it. ``fix`` reads its verdicts as workarounds (its
unfixed reference row is expected to break where the bug reproduces); every other command
reads them as findings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fsdpqdiag.core.verdict import VerdictKind

# Exit codes a command's results decide (report.model has the others).
EXIT_CLEAN = 0
EXIT_FOUND = 1
EXIT_PROBE_FAILED = 3
# The workaround name of fix's unfixed reference row.
UNFIXED = "none"


@dataclass(frozen=True)
class CommandKind:
    """How a command's results end it: ``exit_code(results)``, what its codes 0 and 1 mean, and
    whether its next steps suggest trying a workaround (not after ``fix`` itself)."""

    exit_code: Callable[[Iterable], int]
    clean_meaning: str
    found_meaning: str
    suggests_fix: bool


def _findings_exit_code(results: Iterable) -> int:
    verdicts = {r.verdict for r in results}
    if verdicts & {VerdictKind.REPRODUCED, VerdictKind.CRASHED, VerdictKind.INCONCLUSIVE}:
        return EXIT_FOUND
    if verdicts & {VerdictKind.ERROR, VerdictKind.TIMEOUT, VerdictKind.UNSUPPORTED}:
        return EXIT_PROBE_FAILED
    return EXIT_CLEAN


def _workarounds_exit_code(results: Iterable) -> int:
    fixed = {r.verdict for r in results if r.config.get("workaround") != UNFIXED}
    # A workaround whose checkpoint loses state cannot be used as it is.
    if fixed & {VerdictKind.NOT_VERIFIED, VerdictKind.STATE_LOST}:
        return EXIT_FOUND
    failed = {VerdictKind.ERROR, VerdictKind.TIMEOUT, VerdictKind.CRASHED, VerdictKind.UNSUPPORTED}
    return EXIT_PROBE_FAILED if fixed & failed else EXIT_CLEAN


FINDINGS = CommandKind(_findings_exit_code, "nothing reproduced", "something was found", suggests_fix=True)
WORKAROUNDS = CommandKind(
    _workarounds_exit_code,
    "every workaround verified, or none needed",
    "a workaround falls short",
    suggests_fix=False,
)
# By the command name a report carries; any other command's results are findings.
KINDS = {"fix": WORKAROUNDS}


def kind_of(command: str) -> CommandKind:
    return KINDS.get(command, FINDINGS)
