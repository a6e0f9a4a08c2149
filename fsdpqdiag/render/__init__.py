"""Views of a Report: rich tables, Markdown, JSON. Renderers never touch torch."""

from __future__ import annotations


def report_tables(report, wide: bool = False):
    """The rich view of any report, chosen by the command that wrote it."""
    # Imported here: the table modules import this package's submodules, and Markdown
    # alone needs none of them.
    from fsdpqdiag.render.fix_table import fix_table
    from fsdpqdiag.render.forensics_table import forensics_table
    from fsdpqdiag.render.localize_table import localize_table
    from fsdpqdiag.render.matrix_table import matrix_table
    from fsdpqdiag.render.table import reproduce_table

    views = {
        "matrix": matrix_table,
        "fix": fix_table,
        "localize": localize_table,
        "forensics": forensics_table,
    }
    return views.get(report.command, reproduce_table)(report, wide)
