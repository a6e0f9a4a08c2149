"""Rich tables of a report: one row per probe and world size, verdicts coloured."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

from fsdpqdiag.core.presentation import WEIGHT_VIEWS, Alarm, bytes_summary, cell
from fsdpqdiag.core.verdict import STYLE
from fsdpqdiag.render.env_table import optional_packages
from fsdpqdiag.render.fitted import Column, FittedTable
from fsdpqdiag.render.preflight_table import summary_lines
from fsdpqdiag.report.model import Report
from fsdpqdiag.tasks import presentation_of

VERDICT_STYLE = STYLE


def _agree(evidence: dict) -> str:
    if "ranks_agree" not in evidence:
        return "–"
    return "yes" if evidence["ranks_agree"] else "NO"


def _probe_label(result) -> str:
    # Shown as Text, never as a str cell: rich would read "[inject NAME]" as markup and drop it.
    return result.probe + (f" [inject {result.injected}]" if result.injected else "")


def detail_tables(report: Report, wide: bool = False) -> list[FittedTable]:
    """Each result's own table, where its probe's presentation draws one (a row per
    configuration it tried); a cell marked as an alarm is drawn in red."""
    tables = []
    for result in report.results:
        table = presentation_of(result.probe).detail(result.evidence)
        if table is None:
            continue
        title = Text(f"{_probe_label(result)} (ws={result.world_size})", style="italic")
        cells = [
            [Text(value, style="bold red") if isinstance(value, Alarm) else value for value in row]
            for row in table.rows
        ]
        tables.append(FittedTable(table.columns, cells, title=title, wide=wide))
    return tables


# One row per probe and world size. At 80 columns a row keeps the probe, its verdict and the
# bytes of the weight forward receives (Mechanism A); the summary lines under the table
# carry the rest in words.
# The four views are WEIGHT_VIEWS, in its order.
REPRODUCE_COLUMNS = (
    Column("probe"),
    Column("ws"),
    Column("device", priority=3),
    Column("verdict"),
    Column("NaN-class el.", priority=4),
    Column("swap target", priority=1),
    Column("_local_tensor", priority=4),
    Column("full_tensor()", priority=2),
    Column("redistribute()", priority=3),
    Column("max |Δy|", priority=2),
    Column("ranks agree", priority=5),
)


def reproduce_table(report: Report, wide: bool = False) -> Group:
    rows = []
    for result in report.results:
        ev = result.evidence
        # Where a probe keeps a view of the weight under its own key, its presentation says
        # which (fused expert storage: what dequantize receives in forward is its swap target).
        presentation = presentation_of(result.probe)
        rows.append(
            [
                Text(_probe_label(result)),
                str(result.world_size),
                f"{result.device}/{result.backend}",
                Text(result.verdict, style=VERDICT_STYLE.get(result.verdict, "")),
                cell(ev.get("nan_elements")),
                *(bytes_summary(presentation.view(ev, name) or None) for name in WEIGHT_VIEWS),
                cell(ev.get("max_abs_delta")),
                _agree(ev),
            ]
        )
    table = FittedTable(REPRODUCE_COLUMNS, rows, title=f"fsdpqdiag {report.command}", wide=wide)
    return Group(table, *_under_the_table(report, wide))


# A result whose evidence is not a weight's views (a guarded training run) reads by its
# probe's own key numbers; at 80 columns they wrap and the device column goes.
FINDINGS_COLUMNS = (
    Column("probe"),
    Column("ws"),
    Column("device", priority=1),
    Column("verdict"),
    Column("key numbers"),
)


def findings_table(report: Report, wide: bool = False) -> Group:
    rows = [
        [
            Text(_probe_label(result)),
            str(result.world_size),
            f"{result.device}/{result.backend}",
            Text(result.verdict, style=VERDICT_STYLE.get(result.verdict, "")),
            presentation_of(result.probe).key_numbers(result.evidence) or "–",
        ]
        for result in report.results
    ]
    table = FittedTable(FINDINGS_COLUMNS, rows, title=f"fsdpqdiag {report.command}", wide=wide)
    return Group(table, *_under_the_table(report, wide))


def _under_the_table(report: Report, wide: bool) -> list:
    """Each result's own table, its verdict line, the preflight and the stack."""
    lines: list = [*detail_tables(report, wide)]
    for result in report.results:
        style = VERDICT_STYLE.get(result.verdict, "")
        lines.append(
            Text.assemble(
                (f"{result.verdict:<15}", style),
                f" {result.probe} (ws={result.world_size}): ",
                result.summary,
            )
        )
    lines += summary_lines(report)
    torch_info = report.env.get("torch", {})
    bnb = report.env.get("bitsandbytes", {})
    gpus = ", ".join(g["name"] for g in report.env.get("gpus", [])) or "no GPU"
    lines.append(
        Text(
            f"stack: torch {torch_info.get('version')} (CUDA {torch_info.get('cuda')}, "
            f"NCCL {torch_info.get('nccl')}), bitsandbytes {bnb.get('version')}"
            f"{optional_packages(report.env)}, {gpus}",
            style="dim",
        )
    )
    return lines
