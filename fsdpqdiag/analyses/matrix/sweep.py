"""The sweep (parent side): every cell's row at one world size.

All cells of one world size run in one launch (``fsdpqdiag.launcher.batch``), led by the stack
preflight; each finished cell is checkpointed, and recorded by rank 0. If a cell kills the
launch, the sweep records it and relaunches from the next cell.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fsdpqdiag.analyses.matrix.cells import Cell
from fsdpqdiag.analyses.matrix.record import append_line
from fsdpqdiag.analyses.matrix.task import NAME
from fsdpqdiag.core.outcome import RankStatus
from fsdpqdiag.launcher import batch
from fsdpqdiag.probes.base import failing_rank


def casualty_row(outcomes: list) -> dict[str, Any]:
    """The row of a cell in which its launch ended: how the rank that ended it ended (the
    same rank a probe's verdict reads; rank 0 is usually one the launcher killed after its
    peer died, and taking it made a SIGSEGV cell an ERROR row "killed: a peer rank ended")."""
    failed = failing_rank(outcomes) or outcomes[0]
    ended = failed.status in (RankStatus.CRASHED, RankStatus.TIMEOUT)
    row = {
        "status": failed.status.value if ended else "error",
        "signal": failed.signal,
        "error": (failed.error or "").strip().splitlines()[-1:] or None,
    }
    if isinstance(row["error"], list):
        row["error"] = row["error"][0] if row["error"] else None
    if failed.python_stack:
        row["python_stack"] = failed.python_stack
    return row


def sweep(
    cells: list[Cell],
    run,
    base_config: dict[str, Any],
    execute: Callable,
    isolate: bool = False,
    done: dict[tuple[str, int], dict] | None = None,
    on_cell: Callable[[str, dict], None] | None = None,
    lead: tuple[batch.Item, Callable[[batch.ProbeOutcomes], bool]] | None = None,
) -> dict[str, dict]:
    """Every cell's row at one world size: one launch for all cells, relaunching after a
    crash from the next cell (or one launch per cell with ``isolate``).

    ``lead``: an item (the stack preflight) that runs first in the same launch, and what
    decides from its outcomes whether the cells still to run must not run (True)."""
    rows: dict[str, dict] = {}
    for cell in cells:
        if done and (cell.name, run.world_size) in done:
            rows[cell.name] = done[(cell.name, run.world_size)]["row"]
            if on_cell:
                on_cell(cell.name, rows[cell.name])
    by_name = {cell.name: cell for cell in cells}
    items = [
        batch.Item(cell.name, NAME, {**base_config, "cell": asdict(cell)})
        for cell in cells
        if cell.name not in rows
    ]
    cell_keys = [item.key for item in items]
    if lead is not None:
        items.insert(0, lead[0])
    reported: set[str] = set()

    def report(name: str, row: dict) -> None:
        # Rank 0 checkpoints every finished cell: reported while the launch runs.
        if name in by_name and name not in reported:
            reported.add(name)
            if on_cell:
                on_cell(name, row)

    def settle(parts: list[batch.ProbeOutcomes]) -> list[str]:
        stop = False
        for part in parts:
            if lead is not None and part.probe == lead[0].key:
                stop = lead[1](part)
                continue
            first = part.outcomes[0]
            if first.status == RankStatus.OK:  # rank 0 finished the cell: its row, as recorded
                rows[part.probe] = first.evidence
            else:  # the launch ended inside this cell: it is the casualty
                rows[part.probe] = casualty_row(part.outcomes)
                # Under torchrun every rank settles the cell; rank 0 alone records it.
                if base_config.get("out_dir") and os.environ.get("RANK", "0") == "0":
                    append_line(
                        Path(base_config["out_dir"]), by_name[part.probe], rows[part.probe], run.world_size
                    )
            report(part.probe, rows[part.probe])
        return [key for key in cell_keys if key not in rows] if stop else []

    batch.run_resilient(
        items,
        run,
        execute,
        settle,
        new_watch=lambda: batch.watch_progress(on_finish=report),
        isolate=isolate,
        lead_rank_decides=cell_keys,
        riders=[lead[0].key] if lead is not None else [],
    )
    return rows
