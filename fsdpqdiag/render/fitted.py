"""Tables that stay legible at any console width, 80 columns of a CI log or a pipe included.

Left to itself, rich shrinks every column of a table that is too wide until it fits, and
folds each cell into shards: at 80 columns a twenty-character probe name became five lines of
four characters and a matrix row fifteen. A ``FittedTable`` instead decides at print time,
for the console it is printed on, which columns to show and how wide each is:

- a word (a probe, module or cell name, a number, a bit pattern) is never split: every
  column is at least as wide as its longest word, except a ``breakable`` column (paths, hashes,
  evidence paths), where a word longer than the column is shortened with ``…`` in its middle,
  keeping both ends (``--wide`` shows it whole);
- values up to ``WRAP_WIDTH`` characters are never wrapped at all; longer free text wraps
  at spaces to at least that width;
- when that does not fit, columns are dropped, the least important first (their
  ``priority``: 0 always shown, higher numbers dropped earlier), and a line under the table
  names what was left out; ``wide=True`` shows every column, however wide the lines get.

Renderers declare columns and rows; they never measure the console themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

# Column is data a probe's presentation declares too (fsdpqdiag.core.presentation, no rich there);
# it is laid out here.
from fsdpqdiag.core.presentation import Column

__all__ = ["Column", "FittedTable"]

# Values this wide or narrower are shown on one line; longer text wraps to at least this.
WRAP_WIDTH = 20
# Where even the always-shown columns do not fit, breakable text folds down to this width.
TIGHT_BREAKABLE_WIDTH = 10
# rich's default box with padding (0, 1): a rule and a space either side of each column,
# and the closing rule of the right edge.
CHROME_PER_COLUMN = 3
CHROME_EDGE = 1


@dataclass(frozen=True)
class _Extent:
    """How much room one column's values and header ask for."""

    natural: int  # the values' longest line: the width at which no value wraps
    longest_word: int  # below this a value's word would be split
    header_natural: int
    header_word: int  # headers wrap at spaces, never inside a word

    def required(self, column: Column, tight: bool) -> int:
        """The narrowest width at which the column stays legible; ``tight`` when even the
        always-shown columns do not fit otherwise: text then wraps down to its longest word."""
        if column.breakable:
            values = min(self.natural, TIGHT_BREAKABLE_WIDTH if tight else WRAP_WIDTH)
        elif self.natural <= WRAP_WIDTH and not tight:
            values = self.natural
        else:
            values = max(self.longest_word, 0 if tight else WRAP_WIDTH)
        return max(values, self.header_word, 1)

    @property
    def unwrapped(self) -> int:
        """The width at which neither the header nor any value wraps."""
        return max(self.natural, self.header_natural, 1)


def _as_text(value: str | Text) -> Text:
    # Values are data, never markup: "[inject nan-canonicalize]" must print as written.
    return value if isinstance(value, Text) else Text(str(value))


def _longest(parts: Sequence[str]) -> int:
    return max((cell_len(part) for part in parts), default=0)


def _extent(column: Column, cells: Sequence[Text]) -> _Extent:
    plains = [cell.plain for cell in cells]
    return _Extent(
        natural=_longest([line for plain in plains for line in plain.splitlines()]),
        longest_word=_longest([word for plain in plains for word in plain.split()]),
        header_natural=cell_len(column.header),
        header_word=_longest(column.header.split()),
    )


def middle_ellipsis(word: str, width: int) -> str:
    """``word`` in ``width`` cells: its head, ``…``, its tail (a path's file, a hash's end)."""
    if cell_len(word) <= width:
        return word
    if width <= 1:
        return "…"[:width]
    tail = (width - 1) // 2
    return word[: width - 1 - tail] + "…" + (word[-tail:] if tail else "")


def _shortened(cell: Text, width: int) -> Text:
    """A breakable cell whose words each fit ``width``: rich then wraps it at spaces only."""
    lines = cell.plain.splitlines() or [""]
    if all(cell_len(word) <= width for line in lines for word in line.split()):
        return cell
    text = "\n".join(" ".join(middle_ellipsis(word, width) for word in line.split(" ")) for line in lines)
    return Text(text, style=cell.style)


def _chrome(columns: int) -> int:
    return CHROME_PER_COLUMN * columns + CHROME_EDGE


class FittedTable:
    """A rich renderable: a table laid out for the width of the console that prints it."""

    def __init__(
        self,
        columns: Sequence[Column],
        rows: Sequence[Sequence[str | Text]],
        *,
        title: str | Text | None = None,
        wide: bool = False,
    ) -> None:
        for row in rows:
            if len(row) != len(columns):
                raise ValueError(f"a row of {len(row)} cells in a table of {len(columns)} columns")
        self.columns = list(columns)
        self.rows = [[_as_text(cell) for cell in row] for row in rows]
        self.title = title
        self.wide = wide
        self.extents = [_extent(column, [row[i] for row in self.rows]) for i, column in enumerate(columns)]

    def shown_columns(self, width: int) -> list[int]:
        """Indices of the columns shown at ``width``: every one when wide, else the
        priority-0 columns and, most important first, every other that still fits."""
        if self.wide:
            return list(range(len(self.columns)))
        shown = [i for i, column in enumerate(self.columns) if column.priority == 0]
        used = self._required(shown, tight=False)
        optional = sorted(
            (i for i, column in enumerate(self.columns) if column.priority > 0),
            key=lambda i: (self.columns[i].priority, i),
        )
        for index in optional:
            extra = self._required([index], tight=False) - CHROME_EDGE
            if used + extra <= width:
                shown.append(index)
                used += extra
        return sorted(shown)

    def widths(self, shown: list[int], width: int) -> list[int]:
        """Each shown column's width: what it requires, then the room left shared out
        among the columns whose text would otherwise wrap, in proportion to their want."""
        if self.wide:  # every value on one line, however long the lines get
            return [self.extents[i].unwrapped for i in shown]
        tight = self._required(shown, tight=False) > width
        widths = [self.extents[i].required(self.columns[i], tight) for i in shown]
        room = width - sum(widths) - _chrome(len(shown))
        wants = [max(0, self.extents[i].unwrapped - w) for i, w in zip(shown, widths)]
        total_want = sum(wants)
        if room <= 0 or total_want == 0:
            return widths
        if total_want <= room:
            return [w + want for w, want in zip(widths, wants)]
        shares = [room * want // total_want for want in wants]
        left = room - sum(shares)
        for position, want in enumerate(wants):  # the rounding remainder, left to right
            if left and want > shares[position]:
                shares[position] += 1
                left -= 1
        return [w + share for w, share in zip(widths, shares)]

    def _required(self, shown: list[int], tight: bool) -> int:
        return sum(self.extents[i].required(self.columns[i], tight) for i in shown) + _chrome(len(shown))

    def hidden_headers(self, width: int) -> list[str]:
        shown = set(self.shown_columns(width))
        return [column.header for i, column in enumerate(self.columns) if i not in shown]

    def table(self, width: int) -> Table:
        shown = self.shown_columns(width)
        widths = self.widths(shown, width)
        table = Table(title=self.title, title_justify="left", padding=(0, 1))
        for index, column_width in zip(shown, widths):
            column = self.columns[index]
            table.add_column(
                column.header,
                width=column_width,
                justify=column.justify,
                # Every column is at least as wide as its longest word, or (breakable) its
                # longer words are shortened below: rich only ever wraps at spaces.
                overflow="fold" if column.breakable else "ellipsis",
            )
        for row in self.rows:
            table.add_row(
                *(
                    _shortened(row[i], w) if self.columns[i].breakable and not self.wide else row[i]
                    for i, w in zip(shown, widths)
                )
            )
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        table = self.table(width)
        needed = sum(c.width or 0 for c in table.columns) + _chrome(len(table.columns))
        # A wide table, or one whose always-shown columns hold words longer than the console
        # is wide, needs more than the console has: it is laid out at its own width (print it
        # with crop=False to keep its right edge), never squeezed into shards.
        yield table if needed <= width else _AtWidth(table, needed)
        hidden = self.hidden_headers(width)
        if hidden:
            yield Text(
                f"not shown at {width} columns: {', '.join(hidden)} (--wide shows every column)",
                style="dim",
            )


class _AtWidth:
    def __init__(self, renderable, width: int) -> None:
        self.renderable, self.width = renderable, width

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield from console.render(self.renderable, options.update_width(self.width))
