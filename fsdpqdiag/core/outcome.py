"""The types the launcher, the ranks and the probes share, and nothing else.

Standard library only, and imported by every layer: the launcher builds a ``RankOutcome``
per rank, probes' verdicts read them, reports store them. Keeping them here, below all of
those, is what lets the package have no import cycle (``tests/core/test_imports.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum


class RankStatus(str, Enum):
    """How a rank ended, as the launcher saw it. A ``str`` Enum, like ``VerdictKind``: a member
    equals and serializes as its string, so a rank's result file and a report read back
    compare equal to it."""

    OK = "ok"
    ERROR = "error"  # raised, or exited non-zero without a result
    CRASHED = "crashed"  # killed by a signal
    TIMEOUT = "timeout"  # killed by the launcher at the run's timeout
    ABORTED = "aborted"  # killed by the launcher because a peer rank ended first
    RUNNING = "running"  # in a rank's result file only: the stage it was in when last written

    # Text shows the value ("crashed"), the same on every Python version (format() and
    # f-strings show a str Enum member differently across them).
    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass
class RankOutcome:
    rank: int
    status: RankStatus
    evidence: dict = field(default_factory=dict)
    stage: str | None = None  # the last stage the rank reported before it ended
    signal: str | None = None
    exit_code: int | None = None
    error: str | None = None
    log_tail: str = ""
    # For a rank killed by a signal: the Python stack faulthandler wrote as it died, trimmed.
    python_stack: str | None = None
    duration_s: float = 0.0
    # Wall-clock time at which the rank caught its exception. The launcher sees ranks end
    # only to its 50 ms poll, in which a rank and the peer its failure broke often both end;
    # this orders them.
    failed_at: float | None = None

    def __post_init__(self) -> None:
        self.status = RankStatus(self.status)  # a status read back from JSON is its string

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> RankOutcome:
        return cls(**data)
