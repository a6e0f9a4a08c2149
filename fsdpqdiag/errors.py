"""The one error every layer may raise for a mistake the user can fix: standard library only,
so the launcher, which learns some of them from its ranks, can raise it without an import
cycle. The CLI turns it into one line on stderr and exit 2, nothing written."""

from __future__ import annotations


class BadInput(ValueError):
    """A mistake in what the user asked for, or a stack that cannot run anything (bitsandbytes
    without its native library): one line, exit 2, no report written."""
