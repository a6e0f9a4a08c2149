"""What a probe gives the renderers to draw its result: plain data, no torch, no rich.

A probe owns its presentation, beside it in ``fsdpqdiag/probes/presentation/<probe>.py``:
a one-line ``key_numbers(evidence) -> str`` and, where its evidence is a table of its own,
a ``detail(evidence) -> DetailTable``. The Markdown and rich renderers find it by the
probe's name (:func:`of`) and draw any of them without knowing the probe.

This module imports nothing of the package, and :func:`of` imports only the presentation
modules, which import only this one: never the probe itself, its rank code or torch
(``fix-verify``'s module imports torch at import time), and never anything that imports a
renderer back. So renderers, probes and ranks may all use it without an import cycle.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType

PRESENTATIONS = "fsdpqdiag.probes.presentation"


def module_name(probe: str) -> str:
    """The module of a probe's presentation: its name with dashes as underscores."""
    return f"{PRESENTATIONS}.{probe.replace('-', '_')}"


def of(probe: str) -> ModuleType | None:
    """The presentation of the probe named ``probe`` (as a report names it), or None where
    it has none: a result of an older or foreign probe is drawn from its verdict alone."""
    if not probe or not probe.replace("-", "").replace("_", "").isalnum():
        return None
    try:
        return importlib.import_module(module_name(probe))
    except ModuleNotFoundError as exc:
        if exc.name != module_name(probe):  # the module exists, an import inside it failed
            raise
        return None


def key_numbers(probe: str, evidence: dict) -> str:
    """The few numbers of a result's evidence that matter, in one line of plain text, as the
    probe named ``probe`` words them (its stages, or nothing, where it has no presentation)."""
    return getattr(of(probe), "key_numbers", default_key_numbers)(evidence)


def detail(probe: str, evidence: dict) -> DetailTable | None:
    """The probe's own table of a result's evidence (a row per configuration it tried), or None."""
    draw = getattr(of(probe), "detail", None)
    return draw(evidence) if draw else None


def sections(probe: str) -> dict[str, str]:
    """Where the probe keeps the standard views of the weight under keys of its own: the
    evidence key of each of "swap_target", "local_tensor", ... (its presentation's
    ``SECTION_KEYS``); empty where it uses the standard keys."""
    return dict(getattr(of(probe), "SECTION_KEYS", None) or {})


@dataclass(frozen=True)
class Column:
    """One column of a table: its header and how it behaves when the console is narrow
    (see ``fsdpqdiag.render.fitted``, which lays it out)."""

    header: str
    # 0: always shown. As the width shrinks, columns of the highest number go first.
    priority: int = 0
    # A value that may legitimately break mid-word (an exception message, a path, a list of
    # call sites): a word too long for the column folds instead of widening the table.
    breakable: bool = False
    justify: str = "left"


class Alarm(str):
    """A cell that says something went wrong ("NO" under "preserved"): drawn emphasized
    where the format can, as plain text where it cannot (Markdown)."""

    __slots__ = ()


@dataclass(frozen=True)
class DetailTable:
    """A probe's own table beside the one-row-per-probe summary (storage-dtype-mismatch's
    row per (quant_storage, param_dtype) combination). Cells are display strings."""

    columns: Sequence[Column]
    rows: Sequence[Sequence[str]]


def cell(value) -> str:
    """A number or None as a display cell."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def bytes_summary(section) -> str:
    """An evidence section of ``fsdpqdiag.bytes.diff`` (or a rank that did not finish it),
    in a few words: "3 el / 6 B", "changed form", "crashed SIGSEGV"."""
    if not isinstance(section, dict):
        return "–"
    if section.get("status") not in (None, "completed"):
        return f"{section['status']} {section.get('signal') or ''}".strip()
    if not section.get("comparable", True):
        return "changed form"
    return f"{section.get('differing_elements', 0)} el / {section.get('differing_bytes', 0)} B"


def stage_summary(entry) -> str:
    """One stage of a staged probe: ok, altered, raised <exception type>, not run."""
    if not isinstance(entry, dict):
        return "–"
    if entry.get("status") == "raised":
        return f"raised {(entry.get('error') or '').split(':', 1)[0]}".strip()
    if entry.get("status") == "not run":
        return "not run"
    return "ok" if entry.get("ok") else "altered"


def default_key_numbers(evidence: dict) -> str:
    """The key numbers of a result whose probe names none: its stages where it has them."""
    if isinstance(evidence.get("stages"), dict):
        return "; ".join(f"{name}: {stage_summary(entry)}" for name, entry in evidence["stages"].items())
    return ""
