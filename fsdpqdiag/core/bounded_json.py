"""JSON read from files a user hands in, parsed with limits.

The files: reports, cells.jsonl records, a model's config.json.

Python's ``json`` bounds nesting only by the recursion limit (a file nested a few hundred
thousand levels deep ends in a ``RecursionError`` traceback), accepts ``NaN`` and
``Infinity``, which strict JSON has not, and keeps the last of two equal keys silently. The
text is therefore scanned first, without recursion, for its size, depth, element count and
longest string; only text within every limit reaches ``json.loads``. Each refusal is one
line naming the limit or the problem.
"""

from __future__ import annotations

import json
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOM = b"\xef\xbb\xbf"
# A string (escapes included) or one structural character: what the depth scan counts.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]', re.DOTALL)


class UntrustedJSONError(ValueError):
    """Input refused: past a limit, not strict JSON, or not UTF-8 text."""


@dataclass(frozen=True)
class Limits:
    """Bounds for one kind of input; the largest real report (forensics of a 1.1B model,
    two ranks) is about 2 MB, nesting 8 deep, with some 60 000 elements."""

    max_bytes: int = 64 << 20
    max_depth: int = 64
    max_elements: int = 5_000_000
    max_string_bytes: int = 1 << 20


REPORT_LIMITS = Limits()
# A cells.jsonl line is one cell's row, bounded as a whole; a long string inside it (a rank's
# log tail, evidence samples) is part of that budget, not held to a tighter one of its own.
RECORD_LIMITS = Limits(max_bytes=16 << 20, max_elements=1_000_000, max_string_bytes=16 << 20)
CONFIG_LIMITS = Limits(max_bytes=4 << 20, max_depth=32, max_elements=200_000, max_string_bytes=64 << 10)


def loads(data: bytes, limits: Limits = REPORT_LIMITS) -> Any:
    """The value of ``data`` as strict JSON, or ``UntrustedJSONError`` in one line that
    completes "<the input> ..." ("is nested deeper than ...", "holds NaN ...")."""
    if len(data) > limits.max_bytes:
        raise UntrustedJSONError(f"is {_size(len(data))}, larger than the limit of {_size(limits.max_bytes)}")
    if data.startswith(BOM):
        raise UntrustedJSONError("starts with a byte-order mark (BOM), which JSON does not allow")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UntrustedJSONError(f"is not UTF-8 text (at byte {exc.start})") from None
    _check_shape(data, limits)
    try:
        return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except ValueError as exc:
        if isinstance(exc, UntrustedJSONError):
            raise
        msg, line = getattr(exc, "msg", str(exc)), getattr(exc, "lineno", None)
        raise UntrustedJSONError(f"is not valid JSON ({msg}{f' at line {line}' if line else ''})") from None


def _check_shape(data: bytes, limits: Limits) -> None:
    """Depth, element count and string length, in one pass of a regular expression."""
    depth = 0
    elements = 0
    for match in _TOKEN.finditer(data):
        token = match.group()
        first = token[:1]
        if first == b'"':
            if len(token) - 2 > limits.max_string_bytes:
                raise UntrustedJSONError(
                    f"holds a string of {_size(len(token) - 2)}, longer than the limit of "
                    f"{_size(limits.max_string_bytes)}"
                )
            continue
        if first in (b"[", b"{"):
            depth += 1
            elements += 1
            if depth > limits.max_depth:
                raise UntrustedJSONError(f"is nested deeper than the limit of {limits.max_depth} levels")
        elif first in (b"]", b"}"):
            depth -= 1
        else:
            elements += 1
        if elements > limits.max_elements:
            raise UntrustedJSONError(f"holds more than the limit of {limits.max_elements} elements")


def _refuse_constant(name: str) -> Any:
    raise UntrustedJSONError(f"holds {name}, which strict JSON does not allow")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            shown = key if len(key) <= 40 else key[:37] + "..."
            raise UntrustedJSONError(f"holds the key {shown!r} twice in one object")
        result[key] = value
    return result


def _size(count: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if count >= 1 << shift:
            return f"{count / (1 << shift):.1f} {unit}"
    return f"{count} bytes"


def load_file(path: str | Path, limits: Limits, error: type[ValueError] = UntrustedJSONError) -> Any:
    """``loads`` of the regular file at ``path``; ``error`` (one line naming the path) when
    it cannot be read or is refused. The size is checked before the file is read."""
    path = Path(path)
    try:
        # A FIFO would block the read until some writer appears: only regular files.
        status = path.stat()
        if not stat.S_ISREG(status.st_mode):
            kind = "it is a directory" if stat.S_ISDIR(status.st_mode) else "not a regular file"
            raise error(f"cannot read {path}: {kind}")
        if status.st_size > limits.max_bytes:
            limit = _size(limits.max_bytes)
            raise error(f"{path} is {_size(status.st_size)}, larger than the limit of {limit}")
        with path.open("rb") as handle:
            raw = handle.read(limits.max_bytes + 1)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from None
    try:
        return loads(raw, limits)
    except UntrustedJSONError as exc:
        raise error(f"{path} {exc}") from None
