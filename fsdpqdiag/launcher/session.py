"""What the launches of one command (or one library caller's several) share, owned by one object.

A ``LaunchSession`` holds the zygotes that fork CPU ranks (``rank_start.ZygotePool``), so a
command's later launches (a relaunch after a casualty, the matrix's isolated cells) skip
seconds of imports, and the stack the latest launch's first rank captured, for the report.
The CLI, ``fsdpqdiag.api`` and the tests open it the same way (``with Session() as s:``); a
plain api call opens a short one (``in_session``). Nothing here is process-wide: two sessions
never share a zygote, and a closed one leaves no process behind.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fsdpqdiag.core.config import RankTask
from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.launcher import launch, rank_start
from fsdpqdiag.launcher.batch import Watch


class LaunchSession:
    def __init__(self, keep_zygotes: bool = True):
        """``keep_zygotes=False``: each launch's zygote ends with it (nothing of a launch
        outlives it, at the cost of importing torch and bitsandbytes again per launch)."""
        self.zygotes = rank_start.ZygotePool(keep=keep_zygotes)
        self._stack: dict[str, Any] | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.zygotes.close()

    def run_task(self, task: RankTask, watch: Watch | None = None) -> list[RankOutcome]:
        """``batch.ExecuteTask``: the task on fresh local ranks, or in-process when this process
        already is a rank of a torchrun job (there ``watch`` has nothing to watch: this
        process learns its results when the task returns)."""
        if launch.in_launched_job():
            from fsdpqdiag.rank.runtime import run_in_job

            return run_in_job(task)
        launched = launch.launch(task, watch=watch, zygotes=self.zygotes)
        if launched.stack is not None:
            self._stack = launched.stack
        return launched.outcomes

    def forget_stack(self) -> None:
        """At a command's start: its report carries the stack its own launches captured."""
        self._stack = None

    def stack(self) -> dict[str, Any]:
        """The stack for a report: as a rank of this command captured it (the same
        interpreter, packages and environment, without importing them here), else captured
        in this process."""
        from fsdpqdiag.rank import env

        return self._stack if self._stack is not None else env.capture()


def in_session(function: Callable) -> Callable:
    """``function(..., session=None)``: without a session, it runs in a short one of its own."""

    @functools.wraps(function)
    def wrapper(*args, session: LaunchSession | None = None, **kwargs):
        if session is not None:
            return function(*args, session=session, **kwargs)
        with LaunchSession() as short:
            return function(*args, session=short, **kwargs)

    return wrapper
