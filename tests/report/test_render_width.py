"""Every table stays legible at 80 columns (a pipe, a CI log); --wide shows every column.

Rendered from the committed reports of every command, so no rank is launched.
"""

import io
import os
import re
import subprocess
import sys

import pytest
from rich.console import Console

from fsdpqdiag.cli.reports import report_tables
from fsdpqdiag.render.compare_table import differences_table
from fsdpqdiag.render.env_table import env_table
from fsdpqdiag.render.fitted import Column, FittedTable
from fsdpqdiag.report.model import Report
from tests.support import ROOT

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


def test_env_and_compare_tables_fit_80_columns():
    captured = {
        "bitsandbytes": {
            "cpu_path": {"inference_repacks_weight": True},
            "native_library": "/very/long/site-packages/bitsandbytes/libbitsandbytes_cpu_avx512bf16.so",
        },
        "log": ["WARNING bitsandbytes.backends.cpu.ops: Failed to load CPU gemm_4bit_forward " * 2],
    }
    lines = _render(env_table(captured))
    assert max(map(len, lines)) <= WIDTH
    assert any("bitsandbytes.cpu_path.inference_repacks_weight" in line for line in lines)
    differences = [
        {
            "result": "nan-canonicalization/ws=2",
            "path": "evidence.swap_target.post_bit_patterns.0x7fff",
            "a": 1119,
            "b": "<absent>",
        }
    ]
    lines = _render(differences_table(differences))
    assert max(map(len, lines)) <= WIDTH
    assert any("nan-canonicalization/ws=2" in line for line in lines)


def test_cli_wide_option_in_a_pipe():
    report = ROOT / "reports" / "reproduce-ws2-cpu-2core-torch2.13-bnb0.50.2.json"

    def table(*extra: str) -> str:
        env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS=str(WIDTH))
        argv = [sys.executable, "-m", "fsdpqdiag", "report", str(report), "-f", "table", *extra]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        return done.stdout

    compact, wide = table(), table("--wide")
    assert max(len(line) for line in compact.splitlines()) <= WIDTH
    assert "redistribute()" not in compact.split("not shown at")[0] and "redistribute()" in compact
    header = next(line for line in wide.splitlines() if "probe" in line and "verdict" in line)
    for column in ("device", "NaN-class el.", "_local_tensor", "redistribute()", "ranks agree"):
        assert column in header
    # the summary lines are unchanged by either layout
    assert "NOT REPRODUCED  nan-canonicalization (ws=2): every byte survives" in " ".join(wide.split("\n"))
