"""moe-expert-quant: MoE experts stored as fused 3-D parameters, quantized, under FSDP2.

The experts are quantized through ``torch.nn.utils.parametrize`` (bitsandbytes' parametrize
API, as axolotl #3439 does on load), with LoRA on the attention and ``fully_shard`` per
decoder layer and at the root.

Quantized this way an expert tensor becomes a plain uint8 ``nn.Parameter`` at
``experts.parametrizations.<name>.original``, which a ``Bnb4bitParametrization``
dequantizes on every access; its quant state stays on the parametrization module, out of
FSDP2's reach, while FSDP2 shards and all-gathers the packed storage like any parameter.
The probe runs stage by stage (build, LoRA, quantize, baseline forward/backward without
FSDP, fully_shard, forward, backward, explicit unshard) and compares the loss, the LoRA
gradients and every byte of the expert storage (as ``dequantize_4bit`` receives it in
forward, as the rank's shard, after unshard) with the baseline. A stage the stack refuses
becomes evidence: the exception and the module it arose in.
"""

from __future__ import annotations

from typing import Any

from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.core.presentation import Presentation, bytes_summary
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict, ranks_agree
from fsdpqdiag.probes.moe_expert_quant.setup import STORAGE_VIEWS
from fsdpqdiag.probes.moe_expert_quant.setup import Stages as Stages  # re-exported: tests drive it
from fsdpqdiag.probes.moe_expert_quant.stages import run
from fsdpqdiag.report.model import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, SKIPPED

PRE_SHARD_STAGES = ("build model", "LoRA", "quantize experts", "baseline forward", "baseline backward")


def _failures(outcomes: list[RankOutcome]) -> list[dict[str, Any]]:
    return [{"rank": o.rank, **f} for o in outcomes for f in o.evidence.get("failures", [])]


def _agreement_key(evidence: dict) -> tuple:
    return (
        tuple((f["stage"], f["exception"]) for f in evidence.get("failures", [])),
        evidence.get("output_bit_equal"),
        evidence.get("max_abs_delta"),
        tuple(
            (view, (evidence.get(f"expert_storage_{view}") or {}).get("differing_elements"))
            for view in ("forward", "unsharded")
        ),
        (evidence.get("lora_grads") or {}).get("bit_equal"),
    )


def _where(failure: dict[str, Any]) -> str:
    place = failure.get("module") or failure.get("while", {}).get("module")
    parameter = failure.get("while", {}).get("parameter")
    if parameter:
        place = f"{place}.{parameter}" if place else parameter
    return (
        f"{failure['exception']} (in {place or 'no module of the model'}; raised at {failure.get('frame')})"
    )


def _storage_findings(outcomes: list[RankOutcome]) -> list[str]:
    """Each view of the expert storage that differs from the quantized original on some rank."""
    findings = []
    for view, label in (
        ("forward", "the expert storage dequantize receives in forward"),
        ("local", "the ranks' expert shards"),
        ("unsharded", "the expert storage after unshard"),
    ):
        sections = {o.rank: o.evidence.get(f"expert_storage_{view}") for o in outcomes}
        broken = {rank: s for rank, s in sections.items() if s and not s["bytes_equal"]}
        if not broken:
            continue
        forms = [s["changed_form"] for s in broken.values() if not s["comparable"]]
        if forms:
            findings.append(f"{label} changed form ({forms[0]})")
        elif view == "local":  # disjoint shards: their differences add up
            changed = sum(s["differing_elements"] for s in broken.values())
            findings.append(f"{label} differ from the quantized original in {changed} elements in all")
        else:  # every rank holds the whole tensor: say how much on the worst rank
            rank, worst = max(broken.items(), key=lambda item: item[1]["differing_elements"])
            findings.append(
                f"{label} differs from the quantized original in {worst['differing_elements']} of "
                f"{worst['elements']} elements ({worst['differing_bytes']} B) on rank {rank}"
                + (f" and {len(broken) - 1} other rank(s)" if len(broken) > 1 else "")
            )
    return findings


def _grad_findings(grads: list[dict[str, Any]]) -> list[str]:
    """The LoRA gradient shards of all ranks against the baseline, where any is off."""
    findings = []
    if any(g["missing"] or g["nonfinite_elements"] or g["differing"] for g in grads):
        shards = sum(g["trainable"] for g in grads)
        missing = sum(len(g["missing"]) for g in grads)
        nonfinite = sum(g["nonfinite_elements"] for g in grads)
        differing = sum(len(g["differing"]) for g in grads)
        delta = max(g["max_abs_delta"] for g in grads)
        findings.append(
            f"LoRA grad shards vs baseline, over all ranks: {missing} of {shards} missing, {nonfinite} "
            f"non-finite elements, {differing} of {shards} differ (max |Δ| {delta})"
        )
    return findings


def verdict(outcomes: list[RankOutcome]) -> Verdict:
    failed = failure_verdict(outcomes)
    if failed is not None:
        return failed
    evidence = dict(outcomes[0].evidence)
    if evidence.get("skipped"):
        return Verdict(SKIPPED, evidence["skipped"], evidence)
    failures = _failures(outcomes)
    evidence["failures_all_ranks"] = failures
    evidence["ranks_agree"] = ranks_agree(outcomes, _agreement_key)
    before_shard = [f for f in failures if f["stage"] in PRE_SHARD_STAGES]
    if before_shard:
        first = before_shard[0]
        return Verdict(
            INCONCLUSIVE,
            f"the setup fails without FSDP2, so FSDP2 is not measured: {first['stage']} on rank "
            f"{first['rank']}: {_where(first)}",
            evidence,
        )
    findings = [f"{f['stage']} fails on rank {f['rank']}: {_where(f)}" for f in failures]
    measured = [o.evidence for o in outcomes]
    if any(e.get("output_bit_equal") is False for e in measured):
        findings.append(
            f"loss {evidence.get('loss')} vs baseline {evidence.get('baseline_loss')} "
            f"(|Δ| = {max(e.get('max_abs_delta') or 0 for e in measured)})"
        )
    findings += _storage_findings(outcomes)
    grads = [e["lora_grads"] for e in measured if "lora_grads" in e]
    findings += _grad_findings(grads)
    unmeasured = sorted(
        {view for e in measured for view in STORAGE_VIEWS if e.get(f"expert_storage_{view}") is None}
    )
    experts = evidence.get("experts", {})
    what = (
        f"{len(experts)} fused expert tensors ({evidence['quantization']['quant_type']}, "
        f"{evidence['quantization']['bits']}-bit via parametrize)"
    )
    if findings:
        return Verdict(REPRODUCED, f"{what}: " + "; ".join(findings), evidence)
    surviving = [view for view in STORAGE_VIEWS if view not in unmeasured] or ["no view measured"]
    grads_text = (
        f"{grads[0]['bit_equal']}/{grads[0]['trainable']} LoRA grads bit-equal to baseline"
        if grads
        else "no backward (LoRA off)"
    )
    return Verdict(
        NOT_REPRODUCED,
        f"{what} shard, forward and backward under fully_shard; loss {evidence.get('loss')} bit-equal "
        f"to baseline; every byte of the expert storage survives ({', '.join(surviving)}); {grads_text}"
        + (f"; not measured: {', '.join(unmeasured)}" if unmeasured else ""),
        evidence,
    )


def attribute(evidence: dict) -> tuple[str, list[str]]:
    from fsdpqdiag.evidence import attribution

    control = (evidence.get("controls") or {}).get("plain_integer_parameters")
    if control is None:
        return attribution.UNDETERMINED, [f"the run ended in {evidence.get('stage') or 'setup'}"]
    said = f"control: plain frozen int8/uint8 parameters through the same fully_shard: {control['outcome']}"
    if control["outcome"] != "kept":
        return attribution.TORCH_FSDP, [said]
    failures = evidence.get("failures_all_ranks") or []
    stage = failures[0]["stage"] if failures else None
    if stage and any(word in stage for word in ("quantize", "dequantize", "parametriz")):
        return attribution.BITSANDBYTES, [said, f"first failing stage: {stage}"]
    return attribution.UNDETERMINED, [said] + ([f"first failing stage: {stage}"] if stage else [])


# How the key numbers name each of the STORAGE_VIEWS.
VIEW_LABELS = {"forward": "in forward", "local": "shard", "unsharded": "after unshard"}
# The expert storage stands for the packed weight of the summary table: what dequantize
# receives in forward is its swap target, the rank's shard its _local_tensor.
SECTION_KEYS = {"swap_target": "expert_storage_forward", "local_tensor": "expert_storage_local"}


def key_numbers(evidence: dict) -> str:
    """How a result reads: loss against the baseline, the expert storage's bytes in each
    view, LoRA gradients, the first failed stage."""
    loss = evidence.get("loss", "– (no forward)")
    parts = [f"loss {loss} vs baseline {evidence.get('baseline_loss', '–')}"]
    parts += [
        f"experts {label}: {bytes_summary(evidence.get(f'expert_storage_{view}'))}"
        for view, label in VIEW_LABELS.items()
    ]
    grads = evidence.get("lora_grads")
    if grads:
        parts.append(f"LoRA grads bit-equal {grads['bit_equal']}/{grads['trainable']}")
    parts += [f"{f['stage']} failed: {f['exception']}" for f in evidence.get("failures", [])[:1]]
    return "; ".join(parts)


PROBE = Probe(
    name="moe-expert-quant",
    description="Qwen3-MoE fused 3-D experts quantized via bnb parametrize + LoRA under fully_shard: "
    "shard, loss vs baseline, backward, expert bytes",
    run=run,
    verdict=verdict,
    needs=Needs(packages=("bitsandbytes", "transformers", "peft")),
    standalone="reproducers/moe_expert_quant.py",
    attribute=attribute,
    # Its backward reduce-scatters the LoRA gradients.
    preconditions=("all_gather_into_tensor", "reduce_scatter_tensor"),
    controls=("swap-packed-nibbles",),
    presentation=Presentation(
        key_numbers,
        sections=SECTION_KEYS,
        reads=frozenset(
            {
                "loss",
                "baseline_loss",
                "lora_grads",
                "failures",
                *(f"expert_storage_{view}" for view in VIEW_LABELS),
            }
        ),
    ),
)
