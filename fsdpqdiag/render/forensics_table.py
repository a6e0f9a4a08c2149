"""Rich table of a forensics report: one row per quantized weight, then the totals."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fsdpqdiag.render.preflight_table import summary_lines
from fsdpqdiag.render.table import VERDICT_STYLE
from fsdpqdiag.report import Report


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def forensics_table(report: Report) -> Group:
    parts = []
    for r in report.results:
        table = Table(title=f"forensics, ws={r.world_size} ({r.device}/{r.backend})", title_justify="left")
        for column in (
            "module",
            "kind",
            "shape",
            "NaN-class",
            "swap target",
            "_local_tensor",
            "full_tensor()",
            "post bits",
            "max |Δout|",
            "mean |Δout|",
        ):
            table.add_column(column, overflow="fold")
        for row in r.evidence.get("modules", []):
            swap = row["swap_target"]
            local = row.get("local_tensor") or {}
            full = row.get("full_tensor") or {}
            table.add_row(
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
            )
        parts.append(table)
        parts.append(Text.assemble(Text(r.verdict, style=VERDICT_STYLE.get(r.verdict, "")), " ", r.summary))
    return Group(*parts, *summary_lines(report))
