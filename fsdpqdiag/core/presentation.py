"""What a probe gives the renderers to draw its result: plain data, no torch, no rich.

A probe owns its presentation, in its own module: a one-line ``key_numbers(evidence) -> str``
and, where its evidence is a table of its own, a ``detail(evidence) -> DetailTable``, handed
to its ``Probe`` as a :class:`Presentation`. The renderers find it by the probe name a result
carries (``fsdpqdiag.tasks.presentation_of``) and draw any of them without knowing the probe.

This module imports nothing of the package, so the probe modules that declare their
presentation with it, the registry's composition and the renderers may all import it
without an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Column:
    """One column of a table: its header and how it behaves when the console is narrow
    (see ``fsdpqdiag.render.fitted``, which lays it out)."""

    header: str
    # 0: always shown. As the width shrinks, columns of the highest number go first.
    priority: int = 0
    # A value whose words may be too long for any column (an exception message, a path, a
    # list of call sites): such a word is shortened with "…" in its middle instead of widening
    # the table; --wide shows it whole.
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
    """An evidence section of ``fsdpqdiag.evidence.bytes.diff`` (or a rank that did not finish it),
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


def no_detail(evidence: dict) -> DetailTable | None:
    """A result whose evidence has no table of its own beside the summary row."""
    return None


# The views of the packed weight the table of probe results has a column for, each by the
# evidence key a probe writes it under unless its presentation's ``sections`` names its own.
WEIGHT_VIEWS: Mapping[str, str] = {
    "swap_target": "swap_target",
    "local_tensor": "local_tensor",
    "full_tensor": "full_tensor",
    "redistribute": "redistribute([Replicate()])",
}


# Compared by identity: a Probe (frozen, hashable) carries one, and its sections are a dict.
@dataclass(frozen=True, eq=False)
class Presentation:
    """How a probe's result reads. The default is how a result of a probe without one, or of
    an older or foreign probe, reads: from its verdict and its stages alone.

    ``reads`` declares every evidence key ``key_numbers`` and ``detail`` read, and
    ``sections`` the keys of the views of the weight it writes under names of its own: a test
    holds both to what the probe writes (``tests/probes/test_probe_contract.py``), so a renamed key
    fails there instead of rendering a blank cell."""

    key_numbers: Callable[[dict], str] = default_key_numbers
    detail: Callable[[dict], DetailTable | None] = no_detail
    # Where the probe keeps a view of the weight (a key of WEIGHT_VIEWS) under a key of its
    # own; empty where it uses the standard keys.
    sections: Mapping[str, str] = field(default_factory=dict)
    reads: frozenset[str] = frozenset({"stages"})

    def view(self, evidence: dict, name: str):
        """The evidence section of the weight view ``name`` (a key of ``WEIGHT_VIEWS``)."""
        return evidence.get(self.sections.get(name, WEIGHT_VIEWS[name]))
