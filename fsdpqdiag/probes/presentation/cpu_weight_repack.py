"""How a cpu-weight-repack result reads: which path bitsandbytes took, and each forward."""

from __future__ import annotations

from fsdpqdiag.presentation import default_key_numbers


def key_numbers(evidence: dict) -> str:
    if "forwards" not in evidence:  # the run ended before its forwards
        return default_key_numbers(evidence)
    path = "repack" if evidence.get("repack_path") else "dequantize"
    return f"{path} path; " + "; ".join(
        f"forward {i + 1}: bytes equal {f['received']['bytes_equal']}, max |Δy| {f['max_abs_delta']}"
        for i, f in enumerate(evidence["forwards"])
    )
