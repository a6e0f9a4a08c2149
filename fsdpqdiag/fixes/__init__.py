"""Workarounds as importable, reversible code: one module each, one registry line."""

from __future__ import annotations

from fsdpqdiag.fixes import axolotl_int8, cached_ref, fsdp2_bytes, uint8_storage
from fsdpqdiag.fixes.base import Handle, Workaround, no_workaround

NONE = Workaround("none", "unfixed: vanilla FSDP2 (the reference row)", no_workaround)
FIXES: dict[str, Workaround] = {
    fix.name: fix
    for fix in (
        cached_ref.WORKAROUND,
        fsdp2_bytes.WORKAROUND,
        uint8_storage.WORKAROUND,
        axolotl_int8.WORKAROUND,
    )
}


def get(name: str) -> Workaround:
    if name == "none":
        return NONE
    if name not in FIXES:
        raise ValueError(f"unknown workaround {name!r} (known: {', '.join(FIXES)}, all)")
    return FIXES[name]


def installable() -> list[str]:
    """The workarounds ``apply`` (and ``watch --fix``) can put into a process as it is."""
    return [name for name, fix in FIXES.items() if fix.install is not None]


def check_installable(name: str) -> Workaround:
    """The workaround ``name``, or a one-line ValueError saying why it cannot be applied to a
    process from outside its script. Imports nothing heavy: callers check before running."""
    if name not in FIXES:
        raise ValueError(f"unknown fix {name!r} (known: {', '.join(installable())})")
    fix = FIXES[name]
    if fix.install is None:
        raise ValueError(
            f"fix {name!r} cannot be applied to an unchanged run: {fix.not_installable} "
            f"(these can: {', '.join(installable())})"
        )
    return fix


def apply(name: str) -> Handle:
    """Apply workaround ``name`` to every model this process shards from now on; call it before
    the first ``fully_shard``. The handle's ``undo()`` (or leaving its ``with`` block) puts
    FSDP2 and bitsandbytes back as they were::

        fsdpqdiag.fixes.apply("fsdp2-bytes")
    """
    return check_installable(name).install()


__all__ = ["FIXES", "Handle", "Workaround", "apply", "check_installable", "get", "installable"]
