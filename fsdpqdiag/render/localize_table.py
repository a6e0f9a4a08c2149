"""Rich tables of a localize report: the ops, then the real unshard's stages."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fsdpqdiag.render.preflight_table import summary_lines
from fsdpqdiag.render.table import VERDICT_STYLE
from fsdpqdiag.report import Report


def _survives(row: dict) -> Text:
    if row.get("status") != "ran":
        return Text(row.get("status", "–"), style="dim")
    if row.get("bytes_equal"):
        return Text("yes", style="green")
    return Text("NO", style="bold red")


def _patterns(row: dict) -> str:
    return ", ".join(f"{p}×{n}" for p, n in list((row.get("post_bit_patterns") or {}).items())[:3]) or "–"


def localize_table(report: Report) -> Group:
    parts = []
    for result in report.results:
        ev = result.evidence
        ops = Table(title=f"ops on {result.device} (every bf16 NaN pattern)", title_justify="left")
        for column in ("op", "bytes survive", "differing", "post bits", "called by FSDP2 in"):
            ops.add_column(column, overflow="fold")
        for row in ev.get("ops", []):
            sites = ", ".join(f"{s['function']}:{s['line']}" for s in row.get("call_sites", [])[:3])
            ops.add_row(
                row["stage"],
                _survives(row),
                str(row.get("differing_elements", "–")),
                _patterns(row),
                sites or "–",
            )
        pipeline = Table(
            title=f"real unshard at ws={result.world_size} ({result.backend})", title_justify="left"
        )
        for column in ("stage", "bytes survive", "differing", "post bits"):
            pipeline.add_column(column, overflow="fold")
        for row in ev.get("pipeline", []):
            pipeline.add_row(
                row["stage"], _survives(row), str(row.get("differing_elements", "–")), _patterns(row)
            )
        verdict = Text(result.verdict, style=VERDICT_STYLE.get(result.verdict, ""))
        parts += [ops, pipeline, Text.assemble(verdict, " ", result.summary)]
        if result.injected:
            parts.append(Text(f"injected fault: {result.injected}", style="yellow"))
    return Group(*parts, *summary_lines(report))
