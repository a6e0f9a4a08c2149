"""Mechanism A of bitsandbytes #1945: packed-NF4 bf16 containers that spell NaN.

Forward a ``Linear4bit`` before and after ``fully_shard`` and compare, bit for bit, the
original packed weight with (1) the tensor ``forward`` receives after sharding (the swap
target), (2) the rank's ``DTensor._local_tensor`` and (3) ``full_tensor()``. The last is
Mechanism B's entry point, so it runs after a checkpoint: if it kills the rank, the first
two comparisons survive in the result.
"""

from __future__ import annotations

from typing import Any

from fsdpqdiag.core.config import LinearConfig
from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.core.presentation import Presentation, bytes_summary
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict, ranks_agree, unfinished_rank
from fsdpqdiag.report.model import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED

FULL_TENSOR_STAGE = "full_tensor()"


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    from fsdpqdiag.analyses.fingerprint import classify
    from fsdpqdiag.evidence.bytes import diff, nan_census, output_delta, plain
    from fsdpqdiag.probes.common import (
        build_linear4bit,
        capture_forward_weight,
        local_shard_of,
        plain_carrier_control,
        shard,
    )

    cfg = LinearConfig(**config)
    linear, x = build_linear4bit(cfg, ctx.device)
    baseline = linear(x).detach().clone()
    original = plain(linear.weight).clone()
    evidence: dict[str, Any] = nan_census(original)
    evidence["shape"] = list(original.shape)

    ctx.checkpoint("fully_shard", evidence)
    shard(linear, ctx, cfg)
    # Taken outside forward: inside it, FSDP2 has swapped in a plain Parameter that has
    # no _local_tensor (#1945's "critical detail").
    local = linear.weight._local_tensor
    evidence["local_tensor"] = diff(local_shard_of(original, ctx.rank, ctx.world_size), local)
    evidence["local_tensor"]["shape"] = list(local.shape)

    captured, handle = capture_forward_weight(linear)
    ctx.checkpoint("forward after fully_shard", evidence)
    after = linear(x).detach().clone()
    handle.remove()
    evidence["swap_target"] = diff(original, captured.tensor)
    evidence["swap_target"].update(captured.describe())
    # A root-cause hint: which conversion, run here on this device, leaves these bits?
    evidence["fingerprint"] = classify(evidence["swap_target"], ctx.device)
    evidence.update(output_delta(baseline, after))
    linear.reshard()

    ctx.checkpoint("control: unshard of a plain parameter with the same bits", evidence)
    evidence["controls"] = {"plain_parameter_same_bits": plain_carrier_control(original, ctx, cfg)}

    ctx.checkpoint(FULL_TENSOR_STAGE, evidence)
    evidence["full_tensor"] = diff(original, linear.weight.full_tensor())
    evidence["full_tensor"]["status"] = "completed"
    return evidence


def _agreement_key(evidence: dict) -> tuple:
    swap = evidence.get("swap_target", {})
    return (
        swap.get("differing_elements"),
        swap.get("positions_digest"),
        tuple(sorted(swap.get("post_bit_patterns", {}).items())),
        evidence.get("max_abs_delta"),
        evidence.get("output_bit_equal"),
    )


def verdict(outcomes: list[RankOutcome]) -> Verdict:
    measured = [o for o in outcomes if "swap_target" in o.evidence]
    if len(measured) < len(outcomes):
        failed = failure_verdict(outcomes)
        if failed is not None:
            return failed
    evidence = dict(measured[0].evidence)
    # A death inside full_tensor() is Mechanism B; Mechanism A's evidence stands.
    for outcome in outcomes:
        if "full_tensor" not in outcome.evidence:
            evidence["full_tensor"] = unfinished_rank(outcome)
            break
    evidence["ranks_agree"] = ranks_agree(measured, _agreement_key)
    evidence["local_tensor_differing_elements_all_ranks"] = sum(
        o.evidence["local_tensor"].get("differing_elements", 0) or 0 for o in measured
    )
    swap = evidence["swap_target"]
    bytes_altered = any(not o.evidence["swap_target"].get("bytes_equal") for o in measured)
    # An output in another dtype with equal values did not change (see bytes.output_delta).
    output_changed = any(
        not (o.evidence.get("output_bit_equal") or o.evidence.get("output_value_equal")) for o in measured
    )
    recast = next((o.evidence for o in measured if _output_recast(o.evidence)), None)
    if not swap.get("comparable", True):
        detail = f"the swap target changed form ({swap['reason']})"
    else:
        detail = (
            f"{swap['differing_elements']} of {evidence['elements']} elements "
            f"({swap['differing_bytes']} bytes) differ in the weight forward receives; "
            f"{evidence['nan_elements']} elements of the original are NaN-class"
        )
    delta = f"max |Δy| = {evidence.get('max_abs_delta')}"
    if bytes_altered and output_changed:
        patterns = ", ".join(list(swap.get("post_bit_patterns", {}))[:3])
        matches = (evidence.get("fingerprint") or {}).get("matches") or ["no candidate conversion"]
        hint = f"fingerprint on {evidence.get('fingerprint', {}).get('device')}: {', '.join(matches)}"
        return Verdict(REPRODUCED, f"{detail}; post bits {patterns}; {delta}; {hint}", evidence)
    if recast is not None and not output_changed:
        output = (
            f"output values equal, in {recast.get('observed_dtype')} instead of "
            f"{recast.get('reference_dtype')} (FSDP2's param_dtype)"
        )
    else:
        output = "output bit-equal"
    if not bytes_altered and not output_changed:
        return Verdict(NOT_REPRODUCED, f"every byte survives; {output}; {detail}", evidence)
    if bytes_altered:
        return Verdict(INCONCLUSIVE, f"{detail}, yet the output is unchanged ({output})", evidence)
    return Verdict(
        INCONCLUSIVE,
        f"every byte survives, yet the output changed ({delta}): not Mechanism A",
        evidence,
    )


def attribute(evidence: dict) -> tuple[str, list[str]]:
    from fsdpqdiag.evidence import attribution

    control = (evidence.get("controls") or {}).get("plain_parameter_same_bits")
    swap = evidence.get("swap_target") or {}
    if control is None or not swap:
        stage = evidence.get("stage") or "setup"
        return attribution.UNDETERMINED, [f"the run ended in {stage} before its control ran"]
    altered = control["outcome"] == "altered"
    result = f"altered {control['differing_elements']} elements" if altered else "kept every byte"
    said = f"control: the same unshard of a plain parameter with the same bits (no bitsandbytes) {result}"
    if swap.get("bytes_equal"):
        return attribution.UNDETERMINED, [said, "forward received every byte; the output moved elsewhere"]
    if control["outcome"] == "altered":
        return attribution.TORCH_FSDP, [
            said,
            "fingerprint: " + ", ".join((evidence.get("fingerprint") or {}).get("matches") or ["none"]),
        ]
    return attribution.BITSANDBYTES, [said, "only the Params4bit path altered bytes"]


def _output_recast(evidence: dict) -> bool:
    return evidence.get("reference_dtype") != evidence.get("observed_dtype")


# The evidence sections of the weight's views this probe writes, in the order a reader
# follows the weight.
SECTIONS = ("swap_target", "local_tensor", "full_tensor")


def views_key_numbers(sections: tuple[str, ...], runs_forward: bool = True):
    """``key_numbers`` of a probe whose evidence is the bytes of the weight's views under
    the keys ``sections``, and, where it runs a forward, the output's max |Δy|."""

    def key_numbers(evidence: dict) -> str:
        """How a result reads: the bytes of each view of the packed weight."""
        parts = [f"{name}: {bytes_summary(evidence.get(name))}" for name in sections if name in evidence]
        if runs_forward and "max_abs_delta" in evidence:
            parts.append(f"max |Δy| {evidence['max_abs_delta']}")
        return "; ".join(parts)

    return key_numbers


key_numbers = views_key_numbers(SECTIONS)


PROBE = Probe(
    name="nan-canonicalization",
    description="Mechanism A: does the weight Linear4bit.forward sees after fully_shard keep every byte?",
    run=run,
    verdict=verdict,
    needs=Needs(),
    standalone="reproducers/nan_canonicalization.py",
    attribute=attribute,
    controls=("nan-canonicalize",),
    presentation=Presentation(key_numbers, reads=frozenset({*SECTIONS, "max_abs_delta"})),
)
