"""Processes as /proc shows them: what a test finds left behind, or kills as a node dies."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str]:
    """``/proc/PID/stat`` after the command name: the state first, then the parent's pid...
    (OSError once the process is gone)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int(stat_fields(int(entry.name))[1])
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
            children.setdefault(parent, []).append(int(entry.name))
    return children


def children_of(pid: int) -> list[int]:
    return _children_by_parent().get(pid, [])


def descendants_of(pid: int) -> list[int]:
    """Every process under ``pid`` (not ``pid`` itself), from one reading of /proc."""
    children = _children_by_parent()
    found, todo = [], list(children.get(pid, []))
    while todo:
        current = todo.pop()
        found.append(current)
        todo += children.get(current, [])
    return found
