"""How a localize result reads: the first stage and the first op that alter bytes."""

from __future__ import annotations


def key_numbers(evidence: dict) -> str:
    stage = (evidence.get("first_altering_stage") or {}).get("stage")
    op = (evidence.get("first_altering_op") or {}).get("stage")
    return f"first altering stage: {stage or 'none'}; first altering op: {op or 'none'}"
