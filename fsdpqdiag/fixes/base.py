"""What a workaround is: prepare before ``fully_shard``, apply after, undo at the end.

Usable from a training script as well as from ``fsdpqdiag fix``::

    handle = fsdpqdiag.fixes.get("fsdp2-bytes").prepare(model)   # before fully_shard
    ... fully_shard(...) ...
    handle.apply()                                               # after fully_shard
    ... train ...
    handle.undo()                                                # bitsandbytes/FSDP2 as they were

Or, for the workarounds that can act on any model the process shards (``install``), one line
before the script's first ``fully_shard``: ``fsdpqdiag.fixes.apply("fsdp2-bytes")``, which is
also what ``fsdpqdiag watch --fix`` and ``GuardCallback(fix=...)`` run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Handle:
    """One application of a workaround to one model; undo() is idempotent."""

    apply_fn: Callable[[], None] = lambda: None
    undo_fns: list[Callable[[], None]] = field(default_factory=list)

    def apply(self) -> Handle:
        self.apply_fn()
        return self

    def undo(self) -> None:
        while self.undo_fns:
            self.undo_fns.pop()()

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


@dataclass(frozen=True)
class Workaround:
    name: str
    description: str
    prepare: Callable[[Any], Handle]
    # Configuration the model must be built with (a configuration-level mitigation).
    build_overrides: dict[str, Any] = field(default_factory=dict)
    byte_true_by_design: bool = True
    # Process-wide: every model sharded after the call gets the workaround, with no handle on
    # the model (the class-level patches FSDP2 reaches whatever name a script imported it by).
    install: Callable[[], Handle] | None = None
    # Why there is no ``install``: what the workaround needs from the script itself.
    not_installable: str = ""


def no_workaround(model) -> Handle:
    return Handle()
