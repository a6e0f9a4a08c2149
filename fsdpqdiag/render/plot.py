"""PNG byte map: where in the packed weight the altered elements fall."""

from __future__ import annotations

import io
from pathlib import Path

from fsdpqdiag.report.model import Report, atomic_write_bytes


def byte_map_sources(report: Report) -> list[tuple[str, dict, int]]:
    """(title, comparison, elements) for each comparison in the report that holds positions."""
    found = []
    for r in report.results:
        for name, section in r.evidence.items():
            if isinstance(section, dict) and "positions" in section and section.get("elements"):
                found.append((f"{r.probe} ws={r.world_size} {name}", section, section["elements"]))
    return found


def altered_sources(report: Report) -> list[tuple[str, dict, int]]:
    """The comparisons with positions in which some element was altered: what a map shows."""
    return [source for source in byte_map_sources(report) if source[1].get("differing_elements")]


def byte_map(report: Report, path: Path, columns: int = 256) -> int:
    """Draw each comparison's altered positions as a grid of blocks; returns maps drawn (0,
    and nothing written, where no element was altered: an empty map says nothing)."""
    sources = altered_sources(report)
    if not sources:
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(
        len(sources), 1, figsize=(8, 2.6 * len(sources)), squeeze=False, constrained_layout=True
    )
    for axis, (title, section, elements) in zip(axes[:, 0], sources):
        rows = -(-elements // columns)
        grid = np.zeros(rows * columns)
        grid[np.asarray(section["positions"], dtype=np.int64)] = 1
        # One pixel per element would be invisible for 10^6 elements: count per block.
        block = max(1, rows // 128)
        counts = (
            grid.reshape(rows, columns)[: (rows // block) * block].reshape(-1, block, columns).sum(axis=1)
        )
        image = axis.imshow(
            counts, cmap="Reds", aspect="auto", interpolation="nearest", vmin=0, vmax=max(1, counts.max())
        )
        axis.set_title(
            f"{title}: {section.get('differing_elements', 0)} of {elements} elements altered", fontsize=9
        )
        # The weight read as rows of `columns` elements, `block` rows summed per pixel row.
        axis.set_xlabel(f"position within each run of {columns} elements of the weight")
        axis.set_ylabel(f"offset in the weight\n(×{columns * block} elements)")
        fig.colorbar(image, ax=axis, label=f"altered elements per pixel (of {block})")
    image_bytes = io.BytesIO()
    fig.savefig(image_bytes, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, image_bytes.getvalue())
    return len(sources)
