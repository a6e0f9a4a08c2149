"""Every table stays legible at 80 columns (a pipe, a CI log); --wide shows every column.

Rendered from the committed reports of every command, so no rank is launched.
"""

import io
import re

import pytest
from rich.console import Console

from fsdpqdiag.render import report_tables
from fsdpqdiag.render.fitted import Column, FittedTable
from fsdpqdiag.report import Report

from .conftest import ROOT

REPORTS = sorted((ROOT / "reports").glob("*.json"))
WIDTH = 80


def _render(renderable, width: int = WIDTH) -> list[str]:
    # crop=False: a line the layout made too wide shows up whole instead of being cut off.
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None).print(renderable, crop=False)
    return buffer.getvalue().splitlines()


def _names(report: Report) -> set[str]:
    """What a reader looks up in each kind of report: probe, module, cell, workaround names."""
    names = set()
    for result in report.results:
        if report.command == "reproduce":  # other commands name their probe in the title only
            names.add(result.probe)
        names.update(row["module"] for row in result.evidence.get("modules", []))
        if "cell" in result.config:
            names.add(result.config["cell"]["name"])
        for key in ("workaround", "target"):
            if key in result.config:
                names.add(result.config[key])
        names.update(row["combination"] for row in result.evidence.get("rows", []))
    return names


@pytest.mark.parametrize("path", REPORTS, ids=[p.name for p in REPORTS])
def test_every_report_fits_80_columns_with_names_whole(path):
    report = Report.load(path)
    lines = _render(report_tables(report))
    too_wide = [line for line in lines if len(line) > WIDTH]
    assert not too_wide, "\n".join(too_wide)
    for name in _names(report):
        assert any(name in line for line in lines), f"{name!r} is split or missing:\n" + "\n".join(lines)


@pytest.mark.parametrize("path", REPORTS, ids=[p.name for p in REPORTS])
def test_wide_shows_every_column_the_compact_view_drops(path):
    report = Report.load(path)
    compact = "\n".join(_render(report_tables(report)))
    wide = "\n".join(_render(report_tables(report, wide=True)))
    # the line under each compact table that names what it left out, its wrapping undone
    notes = re.findall(r"not shown at 80 columns: (.*?) \(--wide", " ".join(compact.split()))
    for table in _fitted_tables(report_tables(report, wide=True)):
        for header in (column.header for column in table.columns):
            assert header in wide, f"--wide lost {header!r}"
        alone = FittedTable(table.columns, table.rows, title=table.title)
        hidden = alone.hidden_headers(WIDTH)
        if hidden:
            assert ", ".join(hidden) in notes
            drawn = "\n".join(_render(alone)).split("not shown at")[0]
            # one-word headers that are not part of another, as "Δ" is of "rel Δ"
            distinct = [header for header in hidden if " " not in header and len(header) > 2]
            assert not any(f" {header} " in drawn for header in distinct)
    assert "not shown at" not in wide


def _fitted_tables(group) -> list[FittedTable]:
    return [part for part in getattr(group, "renderables", [group]) if isinstance(part, FittedTable)]


def test_a_long_probe_label_keeps_the_probe_name_whole_and_drops_columns_not_words():
    columns = [Column("probe"), Column("verdict"), *(Column(f"column {i}", priority=i) for i in range(1, 9))]
    row = ["nan-canonicalization [inject nan-canonicalize]", "NOT REPRODUCED"] + ["1119 el / 1840 B"] * 8
    table = FittedTable(columns, [row])
    lines = _render(table)
    assert max(map(len, lines)) <= WIDTH
    assert any("nan-canonicalization" in line for line in lines)
    assert any("NOT REPRODUCED" in line for line in lines)
    assert any("1119 el / 1840 B" in line for line in lines)  # short values never wrap
    shown = [c.header for c in columns if any(f" {c.header} " in line for line in lines)]
    assert shown[:3] == ["probe", "verdict", "column 1"]  # the most important first
    assert table.hidden_headers(WIDTH)[-1] == "column 8"
    assert any("--wide shows every column" in line for line in lines)
    # at a terminal wide enough, nothing is dropped and nothing wraps
    assert FittedTable(columns, [row]).hidden_headers(250) == []
    assert len([line for line in _render(table, width=250) if "nan-canonicalization" in line]) == 1
