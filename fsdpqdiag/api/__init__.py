"""The library behind the CLI: every command is a function returning a ``Report``.

Input a user can get wrong is checked first (``BadInput``, in ``checks``), before any rank
starts or any file is written; what the stack under test does becomes a ``ProbeResult``
(``running``). The commands live in ``commands`` and ``sweep`` (the matrix); import them
from here, ``fsdpqdiag.api``, the one surface the CLI and the tests use. Each plain function
runs in a short ``Session`` of its own; ``with Session() as s: s.reproduce(...)`` shares one
between several (``session``).
"""

from __future__ import annotations

# Importing fsdpqdiag.tasks registers every rank task: a task run in this process (under
# torchrun, ``rank.run_in_job``) is looked up in the registry it fills.
from fsdpqdiag import tasks as _every_task  # noqa: F401
from fsdpqdiag.api.checks import (
    BadInput,
    check_inject,
    check_probes,
    check_world_size,
    default_world_size,
    merged,
    require_stack,
    resolve_backend,
    resolve_device,
    run_configs,
    visible_gpus,
)
from fsdpqdiag.api.commands import doctor, fix, forensics, localize, reproduce
from fsdpqdiag.api.running import preflight, preflight_ok, run_checked, run_probe, run_probes, unsupported
from fsdpqdiag.api.session import Session
from fsdpqdiag.api.sweep import matrix

__all__ = [
    "BadInput",
    "Session",
    "run_configs",
    "check_inject",
    "check_probes",
    "check_world_size",
    "default_world_size",
    "doctor",
    "fix",
    "forensics",
    "localize",
    "matrix",
    "merged",
    "preflight",
    "preflight_ok",
    "reproduce",
    "require_stack",
    "resolve_backend",
    "resolve_device",
    "run_checked",
    "run_probe",
    "run_probes",
    "unsupported",
    "visible_gpus",
]
