"""How a quant-state-loss result reads: what forward got, what the recovery did, and after."""

from __future__ import annotations


def key_numbers(evidence: dict) -> str:
    handed, recovery = evidence.get("forward_weight") or {}, evidence.get("recovery") or {}
    reshard, update = evidence.get("after_reshard") or {}, evidence.get("after_update") or {}
    parts = [
        f"forward gets {handed.get('type')} quant_state={handed.get('has_quant_state')}",
        f"recovered={recovery.get('restored')} replaced weight={recovery.get('replaced_module_weight')} "
        f"shares FSDP2 storage={recovery.get('uses_fsdp_storage')}",
    ]
    if (evidence.get("forward") or {}).get("error"):
        parts.append(f"forward raised {evidence['forward']['error']}")
    if reshard:
        parts.append(f"freed on reshard={reshard.get('memory_freed')}")
    if update:
        parts.append(f"stale after update={update.get('stale')}")
    return "; ".join(parts)
