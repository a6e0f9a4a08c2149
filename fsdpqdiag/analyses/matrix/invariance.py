"""Invariance analysis (pure): for each dimension, does the outcome depend on it?"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fsdpqdiag.analyses.matrix.cells import (
    CASTING_POLICIES,
    DIMENSIONS,
    NON_CASTING_POLICIES,
    Cell,
    cell_verdict,
)

# The claim #1945 concludes with: the alteration comes from the bf16 param_dtype cast.
CAST_QUESTION = "param_dtype_cast"


def outcome_key(row: dict) -> tuple:
    if row.get("status") != "ok":
        return ("failed", row.get("status"))
    return (
        row.get("loss_fsdp2_bits"),
        row.get("differing_elements"),
        tuple(sorted((row.get("post_bit_patterns") or {}).items())),
    )


def invariance(table: list[dict], dimensions: Sequence[str] = DIMENSIONS) -> dict[str, Any]:
    """For each dimension: invariant / depends / untested, with the supporting cell pairs.

    ``table`` rows hold the cell's dimension values, ``name`` and ``outcome`` (any
    hashable). Two cells support a claim about a dimension when they differ in it alone.
    """
    result: dict[str, Any] = {}
    for dimension in dimensions:
        pairs_same, pairs_diff, not_comparable = [], [], set()
        for a, b in itertools.combinations(table, 2):
            if a.get(dimension) == b.get(dimension):
                continue
            if any(a.get(d) != b.get(d) for d in dimensions if d != dimension):
                continue
            # A cell that raised or crashed measured nothing: it neither supports nor refutes.
            failed = [row["name"] for row in (a, b) if not row.get("comparable", True)]
            if failed:
                not_comparable.update(failed)
                continue
            (pairs_same if a["outcome"] == b["outcome"] else pairs_diff).append([a["name"], b["name"]])
        status = "depends" if pairs_diff else "invariant" if pairs_same else "untested"
        result[dimension] = {
            "status": status,
            "same_outcome": pairs_same,
            "different_outcome": pairs_diff,
            "not_comparable": sorted(not_comparable),
        }
    invariant = [d for d, v in result.items() if v["status"] == "invariant"]
    depends = [d for d, v in result.items() if v["status"] == "depends"]
    result["summary"] = (
        f"Invariant in: {', '.join(invariant) or 'nothing tested'}; "
        f"Depends on: {', '.join(depends) or 'nothing'}"
    )
    cast = cast_dependence(table, dimensions)
    if cast["status"] != "untested":
        result[CAST_QUESTION] = cast
        answer = "yes" if cast["status"] == "depends" else "no"
        result["summary"] += f"; needs the bf16 param_dtype cast: {answer}"
    return result


def cast_dependence(table: list[dict], dimensions: Sequence[str] = DIMENSIONS) -> dict[str, Any]:
    """Does the outcome need the bf16 ``param_dtype`` cast? Pairs of a cell whose policy
    casts and one whose does not (an empty policy, or none given), equal in every other
    dimension: ``depends`` where a pair's outcomes differ, ``invariant`` where all agree."""
    same, different, not_comparable = [], [], set()
    casting = [row for row in table if row.get("mp") in CASTING_POLICIES]
    plain = [row for row in table if row.get("mp") in NON_CASTING_POLICIES]
    for a, b in itertools.product(casting, plain):
        if any(a.get(d) != b.get(d) for d in dimensions if d != "mp"):
            continue
        failed = [row["name"] for row in (a, b) if not row.get("comparable", True)]
        if failed:
            not_comparable.update(failed)
            continue
        (same if a["outcome"] == b["outcome"] else different).append([a["name"], b["name"]])
    return {
        "status": "depends" if different else "invariant" if same else "untested",
        "same_outcome": same,
        "different_outcome": different,
        "not_comparable": sorted(not_comparable),
    }


def table_rows(cells: list[Cell], rows: dict[str, dict], by_verdict: bool = False) -> list[dict]:
    table = []
    for cell in cells:
        row = rows.get(cell.name, {})
        values = asdict(cell)
        values["outcome"] = cell_verdict(row) if by_verdict else outcome_key(row)
        values["comparable"] = row.get("status") == "ok"
        table.append(values)
    return table


def dataframe(cells: list[Cell], rows_by_ws: dict[int, dict[str, dict]]):
    import pandas as pd

    records = []
    for world_size, rows in rows_by_ws.items():
        for cell in cells:
            row = rows.get(cell.name, {})
            records.append(
                {
                    "cell": cell.name,
                    "world_size": world_size,
                    **{k: v for k, v in asdict(cell).items() if k != "name"},
                    "verdict": cell_verdict(row) if row else "MISSING",
                    **{
                        k: row.get(k)
                        for k in (
                            "fsdp_units",
                            "loss_baseline",
                            "loss_fsdp2",
                            "delta",
                            "relative_delta",
                            "loss_bit_equal",
                            "differing_elements",
                            "differing_nan_class",
                            "first_altered_module",
                            "error",
                        )
                    },
                    "post_bit_patterns": json.dumps(row.get("post_bit_patterns") or {}),
                }
            )
    return pd.DataFrame.from_records(records)
