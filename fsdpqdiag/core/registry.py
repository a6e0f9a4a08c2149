"""The one registry of rank tasks, by name.

A task is anything with a ``name`` that a rank can run (in practice a
``fsdpqdiag.probes.base.Probe``): the probes ``reproduce`` runs, and the rank tasks of the
other commands (localize, forensics, matrix, fix verification, the stack preflight). A rank
process gets a task's name in task.json and looks it up here. A report's result carries the
same name, by which the renderers find how it reads (:func:`presentation`).

This module imports nothing from the package, so every layer may import it without an
import cycle. It is filled by ``fsdpqdiag.tasks``, the one module that imports every task
module and registers it; whoever looks a task up imports that module first (``api``, the
rank process's entry ``fsdpqdiag.rank.main``).
"""

from __future__ import annotations

from typing import Any

_TASKS: dict[str, Any] = {}
# The probes `reproduce` runs by default, in the order they were registered.
_REPRODUCE: list[str] = []
# How results read that carry a probe name but no rank task wrote (the guard's, merged by
# `watch`): a task's own presentation travels with the task.
_PRESENTATIONS: dict[str, Any] = {}


def register(task: Any, *, reproduce: bool = False) -> Any:
    """Add ``task`` under its name; ``reproduce``: it is one of the probes ``reproduce`` runs.

    Two tasks of one name would make a rank run whichever registered last: refused.
    """
    if task.name in _TASKS:
        raise ValueError(f"a task named {task.name!r} is already registered ({_TASKS[task.name]!r})")
    _TASKS[task.name] = task
    if reproduce:
        _REPRODUCE.append(task.name)
    return task


def unregister(name: str) -> None:
    """Remove a task (tests that register their own)."""
    _TASKS.pop(name, None)
    if name in _REPRODUCE:
        _REPRODUCE.remove(name)


def present(name: str, presentation: Any) -> None:
    """How the results that carry the probe name ``name`` read, where no rank task writes them.

    A name already a task's, or already given, would leave two ways to read one result: refused.
    """
    if name in _TASKS or name in _PRESENTATIONS:
        raise ValueError(f"results named {name!r} already have a presentation")
    _PRESENTATIONS[name] = presentation


def presentation(name: str) -> Any | None:
    """How a result that carries the probe name ``name`` reads: its task's presentation, or
    the one given with :func:`present`; None for a name nothing registered (an older or
    foreign report's probe)."""
    if name in _TASKS:
        return getattr(_TASKS[name], "presentation", None)
    return _PRESENTATIONS.get(name)


def get_task(name: str) -> Any:
    try:
        return _TASKS[name]
    except KeyError:
        raise ValueError(f"unknown probe {name!r} (known: {', '.join(_REPRODUCE)})") from None


def reproduce_probes() -> dict[str, Any]:
    """The probes ``reproduce`` runs, by name, in their default order."""
    return {name: _TASKS[name] for name in _REPRODUCE}


def all_tasks() -> dict[str, Any]:
    return dict(_TASKS)
