"""The `compare` command's table: each difference between two reports, leaf by leaf."""

from __future__ import annotations

from fsdpqdiag.render.fitted import Column, FittedTable

# How many differences, and how many characters of each value, a terminal is shown; --json
# has them all.
SHOWN_DIFFERENCES = 200
SHOWN_VALUE_CHARS = 80

# Evidence paths (evidence.swap_target.post_bit_patterns.0x7fff) and values are one long
# word each: they may fold; the result they belong to never splits.
COMPARE_COLUMNS = (
    Column("result"),
    Column("path", breakable=True),
    Column("A", breakable=True),
    Column("B", breakable=True),
)


def differences_table(differences: list[dict], wide: bool = False) -> FittedTable:
    rows = [
        [item["result"], item["path"], str(item["a"])[:SHOWN_VALUE_CHARS], str(item["b"])[:SHOWN_VALUE_CHARS]]
        for item in differences[:SHOWN_DIFFERENCES]
    ]
    return FittedTable(COMPARE_COLUMNS, rows, wide=wide)
