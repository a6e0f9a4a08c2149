"""How a matrix cell reads: its loss against the unsharded baseline, and the differing elements."""

from __future__ import annotations


def key_numbers(evidence: dict) -> str:
    loss, baseline = evidence.get("loss_fsdp2"), evidence.get("loss_baseline")
    return f"loss {loss} vs {baseline}; differing {evidence.get('differing_elements')}"
