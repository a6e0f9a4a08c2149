"""How a moe-expert-quant result reads: loss against the baseline, the expert storage's bytes
in each view, LoRA gradients, the first failed stage."""

from __future__ import annotations

from fsdpqdiag.presentation import bytes_summary

VIEWS = {"forward": "in forward", "local": "shard", "unsharded": "after unshard"}
# The expert storage stands for the packed weight of the summary table: what dequantize
# receives in forward is its swap target, the rank's shard its _local_tensor.
SECTION_KEYS = {"swap_target": "expert_storage_forward", "local_tensor": "expert_storage_local"}


def key_numbers(evidence: dict) -> str:
    loss = evidence.get("loss", "– (no forward)")
    parts = [f"loss {loss} vs baseline {evidence.get('baseline_loss', '–')}"]
    parts += [
        f"experts {label}: {bytes_summary(evidence.get(f'expert_storage_{view}'))}"
        for view, label in VIEWS.items()
    ]
    grads = evidence.get("lora_grads")
    if grads:
        parts.append(f"LoRA grads bit-equal {grads['bit_equal']}/{grads['trainable']}")
    parts += [f"{f['stage']} failed: {f['exception']}" for f in evidence.get("failures", [])[:1]]
    return "; ".join(parts)
