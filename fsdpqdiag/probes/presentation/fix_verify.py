"""How a workaround's verification reads: where it first diverged from the baseline."""

from __future__ import annotations


def key_numbers(evidence: dict) -> str:
    return f"first divergence: {evidence.get('first_divergence') or 'none'}"
