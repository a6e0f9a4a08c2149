"""The verdicts a probe, a matrix cell or a fix can end in, and how each is shown.

A ``str`` Enum: a member is equal to, hashes like and serializes as its string, so reports
keep the JSON they always had ("NOT REPRODUCED", not "VerdictKind.NOT_REPRODUCED") and a
verdict read back from a report compares equal to the member. Standard library only: the
renderers and the CLI import this without torch. (``VerdictKind`` because ``Verdict`` is
already the name of a probe's decision, ``fsdpqdiag.probes.base.Verdict``.)
"""

from __future__ import annotations

from enum import Enum


class VerdictKind(str, Enum):
    REPRODUCED = "REPRODUCED"
    NOT_REPRODUCED = "NOT REPRODUCED"
    CRASHED = "CRASHED"
    ERROR = "ERROR"
    TIMEOUT = "TIMEOUT"
    SKIPPED = "SKIPPED"
    # The evidence contradicts itself (e.g. the output moved while every byte survived):
    # something is wrong, but not the mechanism this probe detects.
    INCONCLUSIVE = "INCONCLUSIVE"
    # Verdicts of `fix`: a workaround is bit-identical to training without FSDP, or not.
    VERIFIED = "VERIFIED"
    NOT_VERIFIED = "NOT VERIFIED"
    # A precondition of the probe failed in the stack preflight (a collective it relies on
    # fails on ordinary tensors, a device/backend that cannot run it): the stack decided.
    UNSUPPORTED = "UNSUPPORTED"
    # Verdicts of `fix` too: training stays bit-identical but a checkpoint loses state it
    # needs to load back (the summary says which); and the unfixed run that already matches,
    # where the stack needs no workaround at all.
    STATE_LOST = "STATE LOST"
    NO_FIX_NEEDED = "NO FIX NEEDED"
    # The stack's own API refused the configuration (FSDP2 raised on an argument it cannot
    # use, as #1945's cell B with mp_policy=None): the stack's answer, not the tool's failure.
    REFUSED = "REFUSED"

    # f-strings, str() and format specs give the bare string on every Python: 3.12 made
    # format() of a mixed-in Enum follow Enum.__str__ ("VerdictKind.REPRODUCED").
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


# The rich style of each verdict in tables (tests/core/test_verdict.py checks every member has one).
STYLE: dict[VerdictKind, str] = {
    VerdictKind.REPRODUCED: "bold red",
    VerdictKind.CRASHED: "bold magenta",
    VerdictKind.INCONCLUSIVE: "bold yellow",
    VerdictKind.NOT_REPRODUCED: "bold green",
    VerdictKind.ERROR: "bold yellow",
    VerdictKind.TIMEOUT: "bold yellow",
    VerdictKind.SKIPPED: "dim",
    VerdictKind.UNSUPPORTED: "bold cyan",
    VerdictKind.VERIFIED: "bold green",
    VerdictKind.NOT_VERIFIED: "bold red",
    VerdictKind.STATE_LOST: "bold red",
    VerdictKind.NO_FIX_NEEDED: "bold green",
    VerdictKind.REFUSED: "bold blue",
}
