"""The ending of every command: a ``help:`` line per finding, one summary line, the next step.

Draws a ``fsdpqdiag.report.conclusion.Conclusion``; decides nothing. Each line is a rich
``Text`` that wraps between words, so at 80 columns and in a pipe no token is split and
nothing is cut (only a word longer than the whole line, such as a very long path, folds).
"""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

from fsdpqdiag.core.verdict import STYLE
from fsdpqdiag.report.conclusion import Conclusion, Finding


def _line(*parts) -> Text:
    return Text.assemble(*parts)


def _help_line(finding: Finding) -> Text:
    where = f"file at {finding.report_to}" if finding.report_to else "nothing to file upstream"
    known = "; ".join(finding.known_issues) or "none known"
    more = f" (+{finding.more_controls} more in the report)" if finding.more_controls else ""
    return _line(
        ("help: ", "bold cyan"),
        (f"{finding.verdict}", STYLE.get(finding.verdict, "")),
        f" {finding.label}: {finding.component}; {where}; known issue: {known}; "
        f"decided by: {finding.decided_by}{more}",
    )


def summary_text(conclusion: Conclusion) -> str:
    counts = ", ".join(f"{n} {verdict}" for verdict, n in conclusion.counts) or "no results"
    return f"{counts} (of {conclusion.total}); exit {conclusion.exit_code}: {conclusion.exit_meaning}"


def conclusion_view(conclusion: Conclusion) -> Group:
    lines = [_help_line(finding) for finding in conclusion.findings.values()]
    lines.append(_line(("summary: ", "bold"), summary_text(conclusion)))
    lines += [_line(("next: ", "bold green"), step) for step in conclusion.next_steps]
    return Group(*lines)


def with_conclusion(view, conclusion: Conclusion) -> Group:
    """A command's view with its ending under it, one flat group (a view is a table or a
    group of tables and lines)."""
    parts = list(view.renderables) if isinstance(view, Group) else [view]
    return Group(*parts, *conclusion_view(conclusion).renderables)
