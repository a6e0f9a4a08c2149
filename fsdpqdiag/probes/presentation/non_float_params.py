"""How a non-float-params result reads: fully_shard's refusal, or each integer parameter's
dtype and bytes after unshard."""

from __future__ import annotations

INTEGER_PARAMS = ("u8", "i8")


def key_numbers(evidence: dict) -> str:
    refusal = evidence.get("fully_shard") or {}
    if refusal.get("status") == "raised":
        return f"fully_shard raised {refusal['error']} ({refusal.get('fsdp_frame') or refusal.get('where')})"
    return "; ".join(
        f"{name}: {evidence[name]['unsharded_dtype']}, bytes equal {evidence[name].get('bytes_equal')}"
        for name in INTEGER_PARAMS
        if name in evidence
    )
