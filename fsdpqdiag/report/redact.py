"""What of a report may leave the machine: no absolute path, no credential, no bare command.

A report is pasted into a public issue. Whatever it recorded about the reporter's machine
(the bitsandbytes native library's path under a home directory, a rank's Python stack,
the output folders, the user's script, an ``--hf-token`` on the command line) is rewritten
here, once, for every renderer: a path inside a Python installation becomes its name
relative to the installation (``site-packages/torch/...`` -> ``torch/...``), any other
absolute path keeps only its last component, and a credential becomes ``<redacted>``.

Pure functions over strings and JSON-like data; stdlib only.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

PLACEHOLDER = "<redacted>"
# Options whose value is a file this run wrote: not part of what reproduces it.
OUTPUT_OPTIONS = ("--json", "--markdown", "--csv", "--out", "--output", "-o", "--plot")
# Option names that carry a secret (``--hf-token``, ``--api-key``, ``--password`` ...).
_SECRET_OPTION = re.compile(r"^--?[\w-]*(token|key|secret|passw(or)?d|credential)s?$", re.IGNORECASE)
# ``HF_TOKEN=...``, ``WANDB_API_KEY=...``, ``DB_PASSWORD=...``: an environment assignment.
_SECRET_ASSIGNMENT = re.compile(
    r"\b([A-Za-z_][A-Za-z0-9_]*(?:TOKEN|KEY|SECRET|PASSWORD|PASSWD)[A-Za-z0-9_]*)=(\"[^\"]*\"|'[^']*'|\S+)",
    re.IGNORECASE,
)
# Values that are credentials whatever option carries them: Hugging Face, GitHub, OpenAI-style.
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{8,}|gh[pousr]_[A-Za-z0-9]{16,}|sk-[A-Za-z0-9_-]{16,})\b")
# An absolute POSIX path: a root-level folder name and at least one more component.
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/-])/(?:[\w.@+~-]+/)+[\w.@+~-]*")
_INSTALL_ROOTS = ("site-packages/", "dist-packages/")
_PACKAGE_MARKERS = (
    "/fsdpqdiag/",
    "/reproducers/",
    "/examples/",
    "/tests/",
    "/bitsandbytes/",
    "/torch/",
    "/transformers/",
    "/peft/",
)


def redact_path(path: str) -> str:
    """An absolute path as a name relative to the package or installation it lies in, or its
    last component."""
    for root in _INSTALL_ROOTS:
        if root in path:
            return path.split(root, 1)[1]
    for marker in _PACKAGE_MARKERS:
        if marker in path:
            return marker.lstrip("/") + path.rsplit(marker, 1)[1]
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name or "<path>"


def redact_text(text: str) -> str:
    """``text`` with every credential replaced and every absolute path shortened."""
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m.group(1)}={PLACEHOLDER}", text)
    text = _SECRET_VALUE.sub(PLACEHOLDER, text)
    return _ABSOLUTE_PATH.sub(lambda m: redact_path(m.group(0)), text)


def redact_data(value: Any) -> Any:
    """A JSON-like tree with ``redact_text`` applied to every string in it (keys included)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {redact_text(k) if isinstance(k, str) else k: redact_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_data(v) for v in value]
    return value


def redact_argv(argv: list[str] | tuple[str, ...], *, drop_outputs: bool = True) -> list[str]:
    """A command line to publish: output options dropped (with their values), credentials
    replaced, paths shortened."""
    kept: list[str] = []
    skip_next = False
    secret_next = False
    own_options = True  # after ``--`` the arguments are the user's command's, outputs included
    for arg in argv:
        if arg == "--":
            own_options = False
        if skip_next:
            skip_next = False
            continue
        if secret_next:
            kept.append(PLACEHOLDER)
            secret_next = False
            continue
        name, eq, _value = arg.partition("=")
        if drop_outputs and own_options and name in OUTPUT_OPTIONS:
            skip_next = not eq
            continue
        if name.startswith("-") and _SECRET_OPTION.match(name):
            if eq:
                kept.append(f"{name}={PLACEHOLDER}")
            else:
                kept.append(arg)
                secret_next = True
            continue
        # One argument is one path even where it holds spaces the text pattern stops at.
        kept.append(redact_path(arg) if arg.startswith("/") else redact_text(arg))
    return kept


def command_line(argv: list[str] | tuple[str, ...], *, drop_outputs: bool = True) -> str:
    """``argv`` redacted and shell-quoted: pasting it runs that command and nothing else."""
    return shlex.join(redact_argv(argv, drop_outputs=drop_outputs))


def redact_report(data: dict[str, Any]) -> dict[str, Any]:
    """A report's JSON as it may be published: its command line without output paths or
    credentials, every other string with ``redact_text``. It still loads against the schema:
    only string values change."""
    return {k: redact_argv(v) if k == "argv" else redact_data(v) for k, v in data.items()}
