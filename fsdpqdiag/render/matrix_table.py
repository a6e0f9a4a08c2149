"""Views of a matrix report: #1945's table, the invariance conclusion, CSV and a heat map."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Group
from rich.text import Text

from fsdpqdiag.render.fitted import Column, FittedTable
from fsdpqdiag.render.preflight_table import summary_lines
from fsdpqdiag.render.table import VERDICT_STYLE
from fsdpqdiag.report.model import Report, atomic_write_bytes


def _num(value, fmt: str = ".16g") -> str:
    return "–" if value is None else format(value, fmt)


# At 80 columns a row keeps what makes the cell (its name, wrap, mp_policy and other
# settings, or its error), how many elements differ, the relative loss delta and the verdict.
# "other" may fold: a --grid cell's name already spells its settings and takes the width.
MATRIX_COLUMNS = (
    Column("cell"),
    Column("wrap", priority=1),
    Column("FSDP units", priority=5),
    Column("mp_policy", priority=1),
    Column("other", breakable=True),
    Column("loss_fsdp2", priority=3),
    Column("baseline", priority=4),
    Column("Δ", priority=4),
    Column("rel Δ", priority=2),
    Column("differing el.", priority=2),
    Column("post bits", priority=3),
    Column("verdict"),
)


def matrix_table(report: Report, wide: bool = False) -> Group:
    parts = []
    for world_size in report.world_sizes:
        rows = []
        for r in (r for r in report.results if r.world_size == world_size):
            cell, ev = r.config["cell"], r.evidence
            other = r.summary if ev.get("status") == "ok" else (ev.get("error") or ev.get("signal") or "")
            patterns = ", ".join(f"{p}×{n}" for p, n in list((ev.get("post_bit_patterns") or {}).items())[:2])
            rows.append(
                [
                    cell["name"],
                    cell["wrap"],
                    _num(ev.get("fsdp_units"), "d"),
                    cell["mp"],
                    "" if other == "defaults" else other,
                    _num(ev.get("loss_fsdp2")),
                    _num(ev.get("loss_baseline")),
                    _num(ev.get("delta"), ".4g"),
                    _num(ev.get("relative_delta"), ".3%"),
                    _num(ev.get("differing_elements"), "d"),
                    patterns or "–",
                    Text(r.verdict, style=VERDICT_STYLE.get(r.verdict, "")),
                ]
            )
        table = FittedTable(MATRIX_COLUMNS, rows, title=f"configuration matrix, ws={world_size}", wide=wide)
        parts.append(table)
        for reading, analysis in report.analysis.get(str(world_size), {}).items():
            label = "exact loss bits and byte pattern" if reading == "exact" else "verdict"
            parts.append(Text(f"[{label}] {analysis['summary']}", style="bold"))
            for dimension, claim in analysis.items():
                if dimension != "summary" and claim["status"] != "untested":
                    pairs = claim["different_outcome"] or claim["same_outcome"]
                    # Spaces around the "/" of a pair of --grid cells let a narrow console wrap
                    # between the two names instead of inside one.
                    support = ", ".join(
                        ("/" if all(len(name) <= 3 for name in p) else " / ").join(p) for p in pairs[:4]
                    )
                    skipped = claim.get("not_comparable") or []
                    note = f"; not comparable: {', '.join(skipped)}" if skipped else ""
                    parts.append(
                        Text(f"  {dimension}: {claim['status']} (cells {support}{note})", style="dim")
                    )
    return Group(*parts, *summary_lines(report))


def heat_map(report: Report, path: Path) -> None:
    """PNG: |Δloss| and differing elements per cell and world size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = list(dict.fromkeys(r.config["cell"]["name"] for r in report.results))
    sizes = report.world_sizes
    grids = {
        "|Δloss|": np.full((len(sizes), len(cells)), np.nan),
        "differing elements": np.full((len(sizes), len(cells)), np.nan),
    }
    for r in report.results:
        i, j = sizes.index(r.world_size), cells.index(r.config["cell"]["name"])
        if r.evidence.get("delta") is not None:
            grids["|Δloss|"][i, j] = abs(r.evidence["delta"])
            grids["differing elements"][i, j] = r.evidence.get("differing_elements", np.nan)
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.9 * len(cells) + 2), 4.5), constrained_layout=True)
    for axis, (title, grid) in zip(axes, grids.items()):
        image = axis.imshow(grid, cmap="magma_r", aspect="auto")
        axis.set_xticks(range(len(cells)), cells, rotation=30, ha="right", fontsize=8)
        axis.set_yticks(range(len(sizes)), [f"ws={s}" for s in sizes])
        axis.set_title(title)
        for (i, j), value in np.ndenumerate(grid):
            axis.text(
                j, i, "err" if np.isnan(value) else f"{value:.3g}", ha="center", va="center", fontsize=7
            )
        fig.colorbar(image, ax=axis)
    fig.suptitle("fsdpqdiag matrix")
    image_bytes = io.BytesIO()
    fig.savefig(image_bytes, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, image_bytes.getvalue())
