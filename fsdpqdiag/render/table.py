"""Rich tables of a report: one row per probe and world size, verdicts coloured."""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

from fsdpqdiag.render.fitted import Column, FittedTable
from fsdpqdiag.render.preflight_table import summary_lines
from fsdpqdiag.report import Report
from fsdpqdiag.verdict import STYLE

VERDICT_STYLE = STYLE


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _bytes_cell(section: dict | None) -> str:
    if not section:
        return "–"
    if section.get("status") not in (None, "completed"):
        signal = section.get("signal")
        return f"{section['status']}{' ' + signal if signal else ''}"
    if not section.get("comparable", True):
        return "changed form"
    return f"{section.get('differing_elements', 0)} el / {section.get('differing_bytes', 0)} B"


def _agree(evidence: dict) -> str:
    if "ranks_agree" not in evidence:
        return "–"
    return "yes" if evidence["ranks_agree"] else "NO"


def _probe_label(result) -> str:
    # Shown as Text, never as a str cell: rich would read "[inject NAME]" as markup and drop it.
    return result.probe + (f" [inject {result.injected}]" if result.injected else "")


# Probes whose evidence is one row per (quant_storage, param_dtype) combination.
COMBINATION_PROBES = ("storage-dtype-mismatch",)
# The headers are shared with Markdown; the priorities say what an 80-column log keeps.
COMBINATION_COLUMNS = (
    Column("storage/params"),
    Column("dtype sharded → forward", priority=2),
    Column("failure"),
    Column("forward weight bytes", priority=1),
    Column("max |Δy|", priority=3),
    Column("preserved"),
)


def combination_cells(row: dict) -> list[str]:
    """One combination row as display cells (the same for the table and Markdown)."""
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
        _cell((row.get("output") or {}).get("max_abs_delta")),
        "yes" if row.get("preserved") else "NO",
    ]


def combination_tables(report: Report, wide: bool = False) -> list[FittedTable]:
    tables = []
    for result in report.results:
        rows = result.evidence.get("rows")
        if result.probe not in COMBINATION_PROBES or not rows:
            continue
        title = Text(f"{_probe_label(result)} (ws={result.world_size})", style="italic")
        cells = []
        for row in rows:
            shown = combination_cells(row)
            cells.append([*shown[:-1], Text(shown[-1], style="" if row.get("preserved") else "bold red")])
        tables.append(FittedTable(COMBINATION_COLUMNS, cells, title=title, wide=wide))
    return tables


# One row per probe and world size. At 80 columns a row keeps the probe, its verdict and the
# bytes of the weight forward receives (Mechanism A); the summary lines under the table
# carry the rest in words.
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
        rows.append(
            [
                Text(_probe_label(result)),
                str(result.world_size),
                f"{result.device}/{result.backend}",
                Text(result.verdict, style=VERDICT_STYLE.get(result.verdict, "")),
                _cell(ev.get("nan_elements")),
                # moe-expert-quant's views of the expert storage: what dequantize receives in
                # forward is its swap target, the rank's shard its _local_tensor.
                _bytes_cell(ev.get("swap_target") or ev.get("expert_storage_forward")),
                _bytes_cell(ev.get("local_tensor") or ev.get("expert_storage_local")),
                _bytes_cell(ev.get("full_tensor") or ev.get("full_tensor()")),
                _bytes_cell(ev.get("redistribute([Replicate()])")),
                _cell(ev.get("max_abs_delta")),
                _agree(ev),
            ]
        )
    table = FittedTable(REPRODUCE_COLUMNS, rows, title=f"fsdpqdiag {report.command}", wide=wide)
    lines = [table, *combination_tables(report, wide)]
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
            f"NCCL {torch_info.get('nccl')}), bitsandbytes {bnb.get('version')}, {gpus}",
            style="dim",
        )
    )
    return Group(*lines)
