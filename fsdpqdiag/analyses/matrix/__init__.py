"""The configuration-invariance matrix of bitsandbytes #1945, computed instead of argued.

- ``cells``: what a cell is, the default cells A-G, ``--grid`` expansion, a row's verdict;
- ``task``: the rank task that runs one cell (registered as ``matrix``);
- ``sweep``: all cells of one world size in one launch, relaunching after a casualty;
- ``record``: cells.jsonl, the sweep's record that ``--resume`` reads back;
- ``invariance``: which dimensions the outcome depends on.
"""

from __future__ import annotations

from fsdpqdiag.analyses.matrix.cells import (
    DEFAULT_CELLS,
    DIMENSIONS,
    GRID_DIMENSIONS,
    MP_POLICIES,
    WRAPS,
    Cell,
    cell_verdict,
    select_cells,
)
from fsdpqdiag.analyses.matrix.invariance import dataframe, invariance, outcome_key, table_rows
from fsdpqdiag.analyses.matrix.record import (
    RECORD_NAME,
    REJECTED_NAME,
    ROW_STATUSES,
    SWEEP_HEADER,
    SWEEP_VERSION,
    RecoveredSweep,
    SweepPlan,
    SweepRecordError,
    append_line,
    recover,
    repair,
    start_record,
)
from fsdpqdiag.analyses.matrix.sweep import casualty_row, sweep
from fsdpqdiag.analyses.matrix.task import PROBE, MatrixConfig, cell_attribution

__all__ = [
    "DEFAULT_CELLS",
    "DIMENSIONS",
    "GRID_DIMENSIONS",
    "MP_POLICIES",
    "PROBE",
    "RECORD_NAME",
    "REJECTED_NAME",
    "ROW_STATUSES",
    "SWEEP_HEADER",
    "SWEEP_VERSION",
    "WRAPS",
    "Cell",
    "MatrixConfig",
    "RecoveredSweep",
    "SweepPlan",
    "SweepRecordError",
    "append_line",
    "casualty_row",
    "cell_attribution",
    "cell_verdict",
    "dataframe",
    "invariance",
    "outcome_key",
    "recover",
    "repair",
    "select_cells",
    "start_record",
    "sweep",
    "table_rows",
]
