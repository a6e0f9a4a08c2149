"""How a nan-canonicalization result reads: the bytes of each view of the packed weight."""

from __future__ import annotations

from fsdpqdiag.presentation import bytes_summary

# The evidence sections of the weight's views, in the order a reader follows the weight.
SECTIONS = ("swap_target", "local_tensor", "full_tensor", "full_tensor()", "redistribute([Replicate()])")


def key_numbers(evidence: dict) -> str:
    parts = [f"{name}: {bytes_summary(evidence.get(name))}" for name in SECTIONS if name in evidence]
    if "max_abs_delta" in evidence:
        parts.append(f"max |Δy| {evidence['max_abs_delta']}")
    return "; ".join(parts)
