"""Rich tables of a localize report: the ops, then the real unshard's stages."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

from fsdpqdiag.render.fitted import Column, FittedTable
from fsdpqdiag.render.preflight_table import summary_lines
from fsdpqdiag.render.table import VERDICT_STYLE
from fsdpqdiag.report.model import Report


def _survives(row: dict) -> Text:
    if row.get("status") != "ran":
        return Text(row.get("status", "–"), style="dim")
    if row.get("bytes_equal"):
        return Text("yes", style="green")
    return Text("NO", style="bold red")


def _patterns(row: dict) -> str:
    return ", ".join(f"{p}×{n}" for p, n in list((row.get("post_bit_patterns") or {}).items())[:3]) or "–"


# FSDP2's call sites are function:line words as long as
# fix_4bit_weight_quant_state_from_module:500: the one column allowed to fold them.
OPS_COLUMNS = (
    Column("op"),
    Column("bytes survive"),
    Column("differing", priority=2),
    Column("post bits", priority=1),
    Column("called by FSDP2 in", priority=3, breakable=True),
)
PIPELINE_COLUMNS = (
    Column("stage"),
    Column("bytes survive"),
    Column("differing", priority=2),
    Column("post bits", priority=1),
)


def localize_table(report: Report, wide: bool = False) -> Group:
    parts = []
    for result in report.results:
        ev = result.evidence
        op_rows = []
        for row in ev.get("ops", []):
            sites = ", ".join(f"{s['function']}:{s['line']}" for s in row.get("call_sites", [])[:3])
            op_rows.append(
                [
                    row["stage"],
                    _survives(row),
                    str(row.get("differing_elements", "–")),
                    _patterns(row),
                    sites or "–",
                ]
            )
        ops = FittedTable(
            OPS_COLUMNS, op_rows, title=f"ops on {result.device} (every bf16 NaN pattern)", wide=wide
        )
        stage_rows = [
            [row["stage"], _survives(row), str(row.get("differing_elements", "–")), _patterns(row)]
            for row in ev.get("pipeline", [])
        ]
        pipeline = FittedTable(
            PIPELINE_COLUMNS,
            stage_rows,
            title=f"real unshard at ws={result.world_size} ({result.backend})",
            wide=wide,
        )
        verdict = Text(result.verdict, style=VERDICT_STYLE.get(result.verdict, ""))
        parts += [ops, pipeline, Text.assemble(verdict, " ", result.summary)]
        if result.injected:
            parts.append(Text(f"injected fault: {result.injected}", style="yellow"))
    return Group(*parts, *summary_lines(report))
