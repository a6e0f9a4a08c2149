"""How a forensics result reads: altered weights, the loss, and how full_tensor() ended."""

from __future__ import annotations

from fsdpqdiag.presentation import default_key_numbers


def key_numbers(evidence: dict) -> str:
    if "totals" not in evidence:  # the ranks ended before the totals
        return default_key_numbers(evidence)
    totals, ended = evidence["totals"], (evidence.get("full_tensor") or {})
    return (
        f"{totals['altered_modules']} of {totals['quantized_modules']} weights altered, "
        f"{totals['differing_elements']} elements; "
        f"loss {evidence.get('loss_before')} → {evidence.get('loss_after')}; "
        f"full_tensor(): {ended.get('signal') or ended.get('status')}"
    )
