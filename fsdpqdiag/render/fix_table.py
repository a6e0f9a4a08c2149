"""Rich table of a fix report: each workaround next to the unfixed run."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

from fsdpqdiag.render.fitted import Column, FittedTable
from fsdpqdiag.render.preflight_table import summary_lines
from fsdpqdiag.render.table import VERDICT_STYLE
from fsdpqdiag.report.model import Report

# VERDICT_STYLE (fsdpqdiag.core.verdict.STYLE) styles VERIFIED / NOT VERIFIED too.
FIX_STYLE = VERDICT_STYLE


# At 80 columns a row keeps which workaround on which target, its verdict and where it first
# diverged from training without FSDP.
FIX_COLUMNS = (
    Column("workaround"),
    Column("target", priority=1),
    Column("ws", priority=3),
    Column("device", priority=4),
    Column("verdict"),
    Column("losses (FSDP2)", priority=2),
    Column("first divergence", priority=1),
    Column("int8 SCB saved", priority=3),
)


def fix_table(report: Report, wide: bool = False) -> Group:
    rows = []
    for r in report.results:
        ev = r.evidence
        first = ev.get("first_divergence")
        where = (
            f"step {first['step']} {first['kind']} {first['tensor']} |Δ| {first['max_abs_delta']}"
            if first
            else "–"
        )
        losses = ", ".join(f"{v:.6g}" for v in ev.get("losses_fsdp", [])) or "–"
        rows.append(
            [
                r.config.get("workaround", "?"),
                r.config.get("target", "?"),
                str(r.world_size),
                f"{r.device}/{r.backend}",
                Text(r.verdict, style=FIX_STYLE.get(r.verdict, "")),
                losses,
                where,
                {True: "yes", False: "LOST"}.get(ev.get("int8_scb_saved"), "–"),
            ]
        )
    table = FittedTable(FIX_COLUMNS, rows, title="fsdpqdiag fix", wide=wide)
    lines = [table]
    if any(r.injected for r in report.results):
        lines.append(Text(f"injected fault: {report.results[0].injected}", style="yellow"))
    return Group(*lines, *summary_lines(report))
