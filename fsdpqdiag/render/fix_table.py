"""Rich table of a fix report: each workaround next to the unfixed run."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fsdpqdiag.render.preflight_table import summary_lines
from fsdpqdiag.render.table import VERDICT_STYLE
from fsdpqdiag.report import Report

FIX_STYLE = {**VERDICT_STYLE, "VERIFIED": "bold green", "NOT VERIFIED": "bold red"}


def fix_table(report: Report) -> Group:
    table = Table(title="fsdpqdiag fix", title_justify="left")
    for column in (
        "workaround",
        "target",
        "ws",
        "device",
        "verdict",
        "losses (FSDP2)",
        "first divergence",
        "int8 SCB saved",
    ):
        table.add_column(column, overflow="fold")
    for r in report.results:
        ev = r.evidence
        first = ev.get("first_divergence")
        where = (
            f"step {first['step']} {first['kind']} {first['tensor']} |Δ| {first['max_abs_delta']}"
            if first
            else "–"
        )
        losses = ", ".join(f"{v:.6g}" for v in ev.get("losses_fsdp", [])) or "–"
        table.add_row(
            r.config.get("workaround", "?"),
            r.config.get("target", "?"),
            str(r.world_size),
            f"{r.device}/{r.backend}",
            Text(r.verdict, style=FIX_STYLE.get(r.verdict, "")),
            losses,
            where,
            {True: "yes", False: "LOST"}.get(ev.get("int8_scb_saved"), "–"),
        )
    lines = [table]
    if any(r.injected for r in report.results):
        lines.append(Text(f"injected fault: {report.results[0].injected}", style="yellow"))
    return Group(*lines, *summary_lines(report))
