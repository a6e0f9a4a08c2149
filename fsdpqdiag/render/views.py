"""The rich view of each command's report, keyed by the command's descriptor.

A report names its command; ``fsdpqdiag.report.commands`` turns the name into a
``CommandKind``, and this table gives its view, so that neither the CLI nor a renderer
branches on a command's name. A test checks that every command has a view.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from rich.console import Group

from fsdpqdiag.render.conclusion import with_conclusion
from fsdpqdiag.render.fix_table import fix_table
from fsdpqdiag.render.forensics_table import forensics_table
from fsdpqdiag.render.localize_table import localize_table
from fsdpqdiag.render.matrix_table import matrix_table
from fsdpqdiag.render.preflight_table import preflight_table
from fsdpqdiag.render.table import findings_table, reproduce_table
from fsdpqdiag.report import commands
from fsdpqdiag.report.conclusion import conclude
from fsdpqdiag.report.model import Report


def doctor_view(report: Report, wide: bool = False) -> Group:
    """Every preflight of a ``doctor`` report in full, one per world size."""
    return Group(*(preflight_table(checked, wide) for checked in report.preflight))


VIEWS: dict[commands.CommandKind, Callable[[Report, bool], Group]] = {
    commands.REPRODUCE: reproduce_table,
    commands.LOCALIZE: localize_table,
    commands.FIX: fix_table,
    commands.FORENSICS: forensics_table,
    commands.MATRIX: matrix_table,
    commands.WATCH: findings_table,
    commands.DOCTOR: doctor_view,
}


def report_view(
    report: Report, wide: bool = False, json_path: str | Path | None = None, exit_code: int | None = None
) -> Group:
    """The view of the command that wrote ``report``, ended (unless the command shows its
    view alone) by the conclusion: a ``help:`` line per finding, the summary, the next step
    (``json_path``: where the report was kept, for that step)."""
    kind = commands.kind_of(report.command)
    view = VIEWS[kind](report, wide)
    if not kind.concludes:
        return view
    return with_conclusion(view, conclude(report, json_path, exit_code))
