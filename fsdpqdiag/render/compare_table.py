"""The `compare` command's view.

A one-line conclusion, the verdicts that changed, the key numbers that moved, then the rest
(listed leaf by leaf under ``--all``).

Draws a ``fsdpqdiag.report.compare.Comparison``; decides nothing.
"""

from __future__ import annotations

from rich.console import Group
from rich.text import Text

from fsdpqdiag.core.presentation import cell
from fsdpqdiag.core.verdict import STYLE
from fsdpqdiag.render.fitted import Column, FittedTable
from fsdpqdiag.report.compare import IDENTICAL, Comparison, result_key

# How many differences, and how many characters of each value, a terminal is shown; --json
# has them all.
SHOWN_DIFFERENCES = 200
SHOWN_VALUE_CHARS = 80

# Evidence paths (evidence.swap_target.post_bit_patterns.0x7fff) and values are one long
# word each: they are shortened in the middle; the result they belong to never splits.
COMPARE_COLUMNS = (
    Column("result"),
    Column("path", breakable=True),
    Column("A", breakable=True),
    Column("B", breakable=True),
)
VERDICT_COLUMNS = (Column("result"), Column("A"), Column("B"))
KEY_NUMBER_COLUMNS = (Column("result"), Column("A", breakable=True), Column("B", breakable=True))


def value_text(value) -> str:
    """A leaf or subtree of a report as a reader reads it: no Python reprs."""
    if isinstance(value, dict):
        if all(not isinstance(v, dict | list) for v in value.values()):
            return ", ".join(f"{key}={value_text(v)}" for key, v in value.items()) or "{}"
        return f"{len(value)} fields ({', '.join(list(value)[:3])}{', …' if len(value) > 3 else ''})"
    if isinstance(value, list):
        if all(not isinstance(v, dict | list) for v in value):
            return ", ".join(value_text(v) for v in value) or "[]"
        return f"{len(value)} items"
    return cell(value)


def differences_table(differences: list[dict], wide: bool = False) -> FittedTable:
    rows = [
        [
            item["result"],
            item["path"],
            value_text(item["a"])[:SHOWN_VALUE_CHARS],
            value_text(item["b"])[:SHOWN_VALUE_CHARS],
        ]
        for item in differences[:SHOWN_DIFFERENCES]
    ]
    return FittedTable(COMPARE_COLUMNS, rows, wide=wide)


def conclusion_line(result: Comparison) -> Text:
    verdicts = result.of_kind("verdict")
    counts = [f"{result.matched} results matched"]
    if verdicts:
        counts.append(f"{len(verdicts)} verdicts changed")
    for label, keys in (("only in A", result.only_in_a), ("only in B", result.only_in_b)):
        if keys:
            counts.append(f"{len(keys)} {label}")
    others = len(result.differences) - len(verdicts)
    counts.append(f"{others} other differences" if others else "every other leaf equal")
    style = "bold green" if result.conclusion == IDENTICAL else "bold yellow"
    return Text.assemble(
        (result.conclusion.upper(), style), f": {'; '.join(counts)} (exit {result.exit_code})"
    )


def _verdict_rows(result: Comparison) -> list[list]:
    rows = []
    for item in result.of_kind("verdict"):
        rows.append(
            [
                item["result"],
                Text(item["a"], STYLE.get(item["a"], "")),
                Text(item["b"], STYLE.get(item["b"], "")),
            ]
        )
    rows += [[key, "(present)", "(absent)"] for key in result.only_in_a]
    rows += [[key, "(absent)", "(present)"] for key in result.only_in_b]
    return rows


def _key_number_rows(result: Comparison, left, right) -> list[list[str]]:
    from fsdpqdiag.tasks import presentation_of

    moved = dict.fromkeys(item["result"] for item in result.of_kind("evidence"))
    by_key_a = {result_key(r): r for r in left.results}
    by_key_b = {result_key(r): r for r in right.results}
    rows = []
    for key in moved:
        a, b = by_key_a[key], by_key_b[key]
        numbers = presentation_of(a.probe).key_numbers
        shown_a, shown_b = numbers(a.evidence) or "–", numbers(b.evidence) or "–"
        if shown_a != shown_b:
            rows.append([key, shown_a, shown_b])
    return rows


def compare_view(result: Comparison, left, right, wide: bool = False, listing: bool = False) -> Group:
    """What changed, most important first; ``listing`` (``--all``): every leaf that differs."""
    parts: list = [conclusion_line(result)]
    verdicts = _verdict_rows(result)
    if verdicts:
        parts.append(FittedTable(VERDICT_COLUMNS, verdicts, title="verdicts that changed", wide=wide))
    numbers = _key_number_rows(result, left, right)
    if numbers:
        parts.append(FittedTable(KEY_NUMBER_COLUMNS, numbers, title="key numbers that moved", wide=wide))
    rest = [item for item in result.differences if item["path"] != "verdict"]
    if rest and listing:
        shown = (
            f" (the first {SHOWN_DIFFERENCES}; --json has them all)" if len(rest) > SHOWN_DIFFERENCES else ""
        )
        parts.append(Text(f"every other difference, leaf by leaf{shown}:"))
        parts.append(differences_table(rest, wide))
    elif rest:
        results = len({item["result"] for item in rest})
        parts.append(
            Text(
                f"{len(rest)} other differences in {results} results: "
                "--all lists them, --json PATH keeps them",
                style="dim",
            )
        )
    if result.environment:
        paths = ", ".join(e["path"] for e in result.environment[:4])
        parts.append(
            Text(f"environments differ in {len(result.environment)} fields (e.g. {paths})", style="dim")
        )
    return Group(*parts)
