"""The sweep's record, cells.jsonl: what ``--resume`` reads back.

The first line is a header holding the sweep's plan (which cells, world sizes, device,
model, ...), written by rename before any cell, so it is never torn; then one line per
finished cell, appended by rank 0 (or by the launcher for a cell that killed its launch).
A kill can tear only the line being appended: the cell in flight.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fsdpqdiag.analyses.matrix.cells import Cell
from fsdpqdiag.core import bounded_json

RECORD_NAME = "cells.jsonl"
REJECTED_NAME = "cells.rejected.jsonl"
# Thousands of cells make a few MB; past this the file is not a record this tool wrote.
MAX_RECORD_BYTES = 256 << 20
SWEEP_HEADER = "fsdpqdiag_sweep"
SWEEP_VERSION = 1
ROW_STATUSES = ("ok", "error", "refused", "crashed", "timeout")


class SweepRecordError(ValueError):
    """A cells.jsonl whose header is missing or damaged: the sweep's plan is unknown."""


@dataclass(frozen=True)
class SweepPlan:
    """What a sweep runs, as recorded in its header; ``--resume`` runs exactly this."""

    cells: list[dict]
    world_sizes: list[int]
    device: str
    backend: str
    model: str | None  # an absolute model directory, or None for the preset
    preset: str
    lora: bool
    inject: str | None

    def header_line(self) -> str:
        return json.dumps({SWEEP_HEADER: SWEEP_VERSION, **asdict(self)}, allow_nan=False) + "\n"

    def cell_list(self) -> list[Cell]:
        return [Cell(**c) for c in self.cells]


@dataclass
class RecoveredSweep:
    """A sweep read back: its plan, its valid records, and what had to be set aside."""

    plan: SweepPlan
    done: dict[tuple[str, int], dict]
    valid_lines: list[bytes]
    torn_tail: bytes = b""
    rejected: list[dict] = field(default_factory=list)

    def needs_repair(self) -> bool:
        return bool(self.torn_tail or self.rejected)

    def summary(self) -> dict[str, Any]:
        return {
            "recorded_cells": len(self.done),
            "torn_line_truncated": bool(self.torn_tail),
            "rejected_records": [{"line": r["line"], "reason": r["reason"]} for r in self.rejected],
        }


def start_record(out_dir: Path, plan: SweepPlan) -> None:
    from fsdpqdiag.report.model import atomic_write_text

    atomic_write_text(out_dir / RECORD_NAME, plan.header_line())


def append_line(out_dir: Path, cell: Cell, row: dict, world_size: int) -> None:
    """One JSON line per finished cell, in one write: a crash can cost at most this line."""
    line = json.dumps({"cell": asdict(cell), "world_size": world_size, "row": row}, allow_nan=False)
    fd = os.open(out_dir / RECORD_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _plan_from_header(line: bytes) -> SweepPlan:
    try:
        data = bounded_json.loads(line, bounded_json.RECORD_LIMITS)
    except bounded_json.UntrustedJSONError as exc:
        raise SweepRecordError(f"its first line {exc}") from None
    if not isinstance(data, dict) or data.get(SWEEP_HEADER) != SWEEP_VERSION:
        raise SweepRecordError(
            f"its first line is not a version-{SWEEP_VERSION} sweep header (written by another "
            "fsdpqdiag, or not a sweep record)"
        )
    fields = {k: v for k, v in data.items() if k != SWEEP_HEADER}
    try:
        plan = SweepPlan(**fields)
        cells = plan.cell_list()
    except TypeError as exc:
        raise SweepRecordError(f"its header is damaged ({exc})") from None
    sizes_ok = isinstance(plan.world_sizes, list) and all(
        isinstance(ws, int) and not isinstance(ws, bool) and ws >= 1 for ws in plan.world_sizes
    )
    if not cells or not sizes_ok or not isinstance(plan.lora, bool):
        raise SweepRecordError("its header is damaged (cells, world sizes or lora of the wrong type)")
    return plan


def _record_problem(item: Any, plan: SweepPlan) -> str | None:
    """Why a line is not a finished cell of this sweep (None when it is one)."""
    if not isinstance(item, dict) or not {"cell", "world_size", "row"} <= item.keys():
        return "not a cell record (needs cell, world_size, row)"
    cell, world_size, row = item["cell"], item["world_size"], item["row"]
    if not isinstance(cell, dict) or cell not in plan.cells:
        return "its cell is not one of this sweep's cells"
    if isinstance(world_size, bool) or world_size not in plan.world_sizes:
        return f"world size {world_size!r} is not one of this sweep's"
    if not isinstance(row, dict) or row.get("status") not in ROW_STATUSES:
        return f"its row has no status among {', '.join(ROW_STATUSES)}"
    if row["status"] == "ok":
        numbers = ("loss_fsdp2", "loss_baseline", "differing_elements")
        if any(isinstance(row.get(k), bool) or not isinstance(row.get(k), (int, float)) for k in numbers):
            return f"an ok row without numeric {', '.join(numbers)}"
        if not isinstance(row.get("loss_bit_equal"), bool):
            return "an ok row without loss_bit_equal"
    return None


def recover(out_dir: Path) -> RecoveredSweep:
    """Read a sweep's record back without changing it: the plan, every valid record (the
    first of duplicates), a torn last line cut off, and each bad line with its reason."""
    path = out_dir / RECORD_NAME
    size = path.stat().st_size
    if size > MAX_RECORD_BYTES:
        raise SweepRecordError(f"it is {size} bytes, larger than the limit of {MAX_RECORD_BYTES} bytes")
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    torn_tail = data[complete:]
    lines = data[:complete].split(b"\n")[:-1]
    if not lines:
        raise SweepRecordError("it holds no complete header line")
    plan = _plan_from_header(lines[0])
    recovered = RecoveredSweep(plan=plan, done={}, valid_lines=[lines[0]], torn_tail=torn_tail)
    first_seen: dict[tuple[str, int], int] = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            item = bounded_json.loads(line, bounded_json.RECORD_LIMITS)
        except bounded_json.UntrustedJSONError as exc:
            item, problem = None, f"the line {exc}"
        else:
            problem = _record_problem(item, plan)
        if problem is None:
            key = (item["cell"]["name"], item["world_size"])
            if key in first_seen:
                problem = (
                    f"a second record of cell {key[0]} at world size {key[1]} (first: line {first_seen[key]})"
                )
            else:
                first_seen[key] = number
                recovered.done[key] = item
                recovered.valid_lines.append(line)
                continue
        recovered.rejected.append({"line": number, "reason": problem, "text": line.decode(errors="replace")})
    return recovered


def repair(out_dir: Path, recovered: RecoveredSweep) -> None:
    """Set aside what ``recover`` rejected, losing nothing: the bad lines and the torn tail go
    to cells.rejected.jsonl first, then cells.jsonl is replaced (by rename) with its header
    and valid records, so the next record starts on a line of its own."""
    from fsdpqdiag.report.model import atomic_write_bytes

    if not recovered.needs_repair():
        return
    set_aside = list(recovered.rejected)
    if recovered.torn_tail:
        set_aside.append(
            {"line": None, "reason": "torn last line", "text": recovered.torn_tail.decode(errors="replace")}
        )
    fd = os.open(out_dir / REJECTED_NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, "".join(json.dumps(item) + "\n" for item in set_aside).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    atomic_write_bytes(out_dir / RECORD_NAME, b"".join(line + b"\n" for line in recovered.valid_lines))
