"""What a published report may not hold: the checks shared by the committed reports' test
and every Markdown report a test run writes (``conftest.shared_cli``)."""

from __future__ import annotations

import re
import shlex

# Roots of a machine's own files, and the folders a Python installation keeps packages in, as
# path segments: an embedded script may name "site-packages/" as a string to strip it.
LOCAL_PATH = re.compile(
    r"(?<![\w.:/-])/(home|root|tmp|work|usr|opt|var|mnt|Users|private)/|[\w.~-]/(site|dist)-packages/"
)
TOKEN = re.compile(
    r"\bhf_[A-Za-z0-9]{8,}|\b[A-Za-z0-9_]*(TOKEN|_KEY|SECRET|PASSWORD)[A-Za-z0-9_]*=(?!<redacted>)\S",
    re.IGNORECASE,
)
# The lines a reader pastes into a shell: those under "To reproduce" and in ```sh blocks.
COMMAND = re.compile(r"^\s*(?:[A-Z_]+=\S+ )*(fsdpqdiag|torchrun|python3?) ")


def leaks(text: str) -> list[str]:
    """Every line of ``text`` holding a local path or a credential."""
    return [line for line in text.splitlines() if LOCAL_PATH.search(line) or TOKEN.search(line)]


def unquoted_commands(markdown: str) -> list[str]:
    """Command lines of ``markdown`` that are not what ``shlex.join`` writes for themselves."""
    bad = []
    for line in markdown.splitlines():
        if not COMMAND.match(line):
            continue
        command = line.split("  # ", 1)[0].strip()
        try:
            if shlex.join(shlex.split(command)) != command:
                bad.append(line)
        except ValueError:
            bad.append(line)
    return bad


def check_markdown(text: str, where: str = "") -> None:
    assert not leaks(text), (where, leaks(text)[:5])
    assert not unquoted_commands(text), (where, unquoted_commands(text)[:5])
