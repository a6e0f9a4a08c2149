"""Rich table of a forensics report: one row per quantized weight, then the totals."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

from fsdpqdiag.render.fitted import Column, FittedTable
from fsdpqdiag.render.preflight_table import summary_lines
from fsdpqdiag.render.table import VERDICT_STYLE
from fsdpqdiag.report.model import Report


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


# At 80 columns a row keeps the module (whole: model.layers.21.self_attn.q_proj), the bytes
# of the weight forward receives, their new bit patterns and the output delta.
FORENSICS_COLUMNS = (
    Column("module"),
    Column("kind", priority=5),
    Column("shape", priority=4),
    Column("NaN-class", priority=3),
    Column("swap target"),
    Column("_local_tensor", priority=3),
    Column("full_tensor()", priority=2),
    Column("post bits", priority=1),
    Column("max |Δout|", priority=1),
    Column("mean |Δout|", priority=4),
)


def forensics_table(report: Report, wide: bool = False) -> Group:
    parts = []
    for r in report.results:
        rows = []
        for row in r.evidence.get("modules", []):
            swap = row["swap_target"]
            local = row.get("local_tensor") or {}
            full = row.get("full_tensor") or {}
            rows.append(
                [
                    row["module"],
                    row["kind"],
                    "×".join(map(str, row["shape"])),
                    str(row["nan_elements"]),
                    f"{_fmt(swap.get('differing_elements'))} el / {_fmt(swap.get('differing_bytes'))} B",
                    _fmt(local.get("differing_elements")),
                    _fmt(full.get("differing_elements")),
                    ", ".join(swap.get("post_bit_patterns") or {}) or "–",
                    _fmt(row.get("max_abs_delta")),
                    _fmt(row.get("mean_abs_delta")),
                ]
            )
        title = f"forensics, ws={r.world_size} ({r.device}/{r.backend})"
        table = FittedTable(FORENSICS_COLUMNS, rows, title=title, wide=wide)
        parts.append(table)
        parts.append(Text.assemble(Text(r.verdict, style=VERDICT_STYLE.get(r.verdict, "")), " ", r.summary))
    return Group(*parts, *summary_lines(report))
