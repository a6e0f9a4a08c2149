"""How a storage-dtype-mismatch result reads: how many mismatched pairs break, and a row per
(quant_storage, param_dtype) combination."""

from __future__ import annotations

from fsdpqdiag.presentation import Alarm, Column, DetailTable, cell

# The priorities say what an 80-column log keeps.
COLUMNS = (
    Column("storage/params"),
    Column("dtype sharded → forward", priority=2),
    Column("failure"),
    Column("forward weight bytes", priority=1),
    Column("max |Δy|", priority=3),
    Column("preserved"),
)


def key_numbers(evidence: dict) -> str:
    failing = evidence.get("failing_combinations") or []
    mismatched = sum(not row["matching"] for row in evidence.get("rows", []))
    return f"{len(failing)} of {mismatched} mismatched pairs break" + (
        f": {', '.join(failing)}" if failing else ""
    )


def detail(evidence: dict) -> DetailTable | None:
    rows = evidence.get("rows")
    if not rows:
        return None
    return DetailTable(COLUMNS, [_cells(row) for row in rows])


def _cells(row: dict) -> list[str]:
    failure = row.get("failure")
    weight = row.get("forward_weight") or {}
    if not weight:
        weight_cell = "–"
    elif weight.get("bytes_equal"):
        weight_cell = "equal"
    elif weight.get("cast_by_value"):
        weight_cell = "cast by value"
    elif weight.get("differing_bytes") is not None:
        weight_cell = f"{weight['differing_bytes']} B differ"
    else:
        weight_cell = f"{weight.get('nbytes_original')} B → {weight.get('nbytes_observed')} B"
    forward_dtype = weight.get("dtype") or row.get("unsharded_dtype")
    return [
        row["combination"] + (" (matching)" if row.get("matching") else ""),
        f"{row.get('sharded_dtype') or '–'} → {forward_dtype or '–'}",
        f"{failure['stage']}: {failure['exception']}" if failure else "–",
        weight_cell,
        cell((row.get("output") or {}).get("max_abs_delta")),
        "yes" if row.get("preserved") else Alarm("NO"),
    ]
