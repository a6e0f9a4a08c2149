"""Views of a matrix report: #1945's table, the invariance conclusion, CSV and a heat map."""

from __future__ import annotations

from pathlib import Path

from rich.console import Group
from rich.table import Table
from rich.text import Text

from fsdpqdiag.render.preflight_table import summary_lines
from fsdpqdiag.render.table import VERDICT_STYLE
from fsdpqdiag.report import Report


def _num(value, fmt: str = ".16g") -> str:
    return "–" if value is None else format(value, fmt)


def matrix_table(report: Report) -> Group:
    parts = []
    for world_size in report.world_sizes:
        table = Table(title=f"configuration matrix, ws={world_size}", title_justify="left")
        for column in (
            "cell",
            "wrap",
            "FSDP units",
            "mp_policy",
            "other",
            "loss_fsdp2",
            "baseline",
            "Δ",
            "rel Δ",
            "differing el.",
            "post bits",
            "verdict",
        ):
            table.add_column(column, overflow="fold")
        for r in (r for r in report.results if r.world_size == world_size):
            cell, ev = r.config["cell"], r.evidence
            other = r.summary if ev.get("status") == "ok" else (ev.get("error") or ev.get("signal") or "")
            patterns = ", ".join(f"{p}×{n}" for p, n in list((ev.get("post_bit_patterns") or {}).items())[:2])
            table.add_row(
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
            )
        parts.append(table)
        for reading, analysis in report.analysis.get(str(world_size), {}).items():
            label = "exact loss bits and byte pattern" if reading == "exact" else "verdict"
            parts.append(Text(f"[{label}] {analysis['summary']}", style="bold"))
            for dimension, claim in analysis.items():
                if dimension != "summary" and claim["status"] != "untested":
                    pairs = claim["different_outcome"] or claim["same_outcome"]
                    support = ", ".join("/".join(p) for p in pairs[:4])
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
    fig.savefig(path, dpi=120)
    plt.close(fig)
