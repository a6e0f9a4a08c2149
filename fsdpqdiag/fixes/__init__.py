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


__all__ = ["FIXES", "Handle", "Workaround", "get"]
