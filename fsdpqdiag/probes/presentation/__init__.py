"""Each probe's presentation, beside the probe: ``<probe module>.py`` here holds its
``key_numbers(evidence) -> str`` and, where it has one, ``detail(evidence) -> DetailTable``.

The probe module imports its presentation and hands it to its ``Probe``; the renderers find
it by the probe's name through :func:`of`, which imports only these modules: never the
probe, its rank code or torch (``fix-verify``'s module imports torch at import time), and
never anything that imports a renderer back. ``tests/test_probe_contract.py`` checks that
every registered probe and rank task carries the presentation found here.
"""

from __future__ import annotations

import importlib
from types import ModuleType


def module_name(probe: str) -> str:
    """The module of a probe's presentation: its name with dashes as underscores."""
    return f"{__name__}.{probe.replace('-', '_')}"


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
