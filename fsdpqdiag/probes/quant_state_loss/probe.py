"""quant-state-loss: does ``Linear4bit`` keep its ``QuantState`` under ``fully_shard``?

And does bitsandbytes' recovery leave FSDP2 in charge of the weight?

FSDP2 swaps a plain ``nn.Parameter`` (no ``quant_state`` attribute) into ``module.weight``
for forward. ``Linear4bit.forward`` first calls ``fix_4bit_weight_quant_state_from_module``,
which wraps that parameter in a new ``Params4bit`` carrying ``module.quant_state`` and
*assigns it to* ``module.weight``. The probe watches the weight at each step of one
training-like cycle -- forward, reshard, an update written into the shard, forward again --
and checks that the tensor the module computes with is still the storage FSDP2 manages:
freed on reshard, refreshed from the shard on the next unshard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fsdpqdiag.core.config import LinearConfig
from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.core.presentation import Presentation
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict, ranks_agree
from fsdpqdiag.probes.quant_state_loss.control import (
    CONTROL,
    differing_elements,
    fsdp_param_of,
    plain_subclass_control,
    same_storage,
    storage_bytes,
    unsharded_of,
)
from fsdpqdiag.report.model import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


@dataclass
class ForwardObservation:
    """One forward of the sharded module, seen from both ends.

    ``handed``: what FSDP2 put in ``module.weight`` when forward starts (a pre-hook that runs
    after FSDP2's unshard). ``used``: ``module.weight`` when forward returns (a post-hook run
    before FSDP2's own, so before any reshard), i.e. after bitsandbytes' recovery, the
    tensor the matmul received. Byte copies are kept; the used tensor itself only weakly,
    so that whether anything else still holds it after reshard can be measured.
    """

    handed: dict[str, Any] = field(default_factory=dict)
    used: dict[str, Any] = field(default_factory=dict)
    handed_bytes: Any = None
    used_bytes: Any = None
    used_ref: Any = None
    used_quant_state: Any = None
    output: Any = None
    error: str | None = None


def observe_forward(module, x, fsdp_param) -> ForwardObservation:
    from fsdpqdiag.probes.common import capture_forward_weight

    seen = ForwardObservation()
    captured, capture_handle = capture_forward_weight(module)

    def before(mod, args):
        seen.handed["is_fsdp_unsharded_param"] = mod.weight is unsharded_of(fsdp_param)

    def after(mod, args, output):
        _record_used(mod, seen, fsdp_param)

    pre_handle = module.register_forward_pre_hook(before)
    # prepend: run before FSDP2's post-forward hook, which may reshard a non-root module.
    post_handle = module.register_forward_hook(after, prepend=True)
    try:
        seen.output = module(x).detach().clone()
    except Exception as exc:  # noqa: BLE001 - the stack's failure is the evidence
        seen.error = f"{type(exc).__name__}: {exc}"
        # No post-hook ran; module.weight is whatever forward left behind.
        _record_used(module, seen, fsdp_param)
    finally:
        for handle in (capture_handle, pre_handle, post_handle):
            handle.remove()
    seen.handed.setdefault("is_fsdp_unsharded_param", None)  # forward may fail before it
    seen.handed.update(captured.describe())
    seen.handed_bytes = captured.tensor
    return seen


def _record_used(mod, seen: ForwardObservation, fsdp_param) -> None:
    import weakref

    from fsdpqdiag.evidence.bytes import plain

    if seen.used_ref is not None:
        return
    weight = mod.weight
    seen.used_quant_state = getattr(weight, "quant_state", None)
    seen.used_ref = weakref.ref(weight)
    seen.used_bytes = plain(weight).clone()
    seen.used.update(
        {
            "type": type(weight).__name__,
            "has_quant_state": seen.used_quant_state is not None,
            "quant_state_is_module_copy": seen.used_quant_state is not None
            and seen.used_quant_state is getattr(mod, "quant_state", None),
            "is_fsdp_unsharded_param": weight is unsharded_of(fsdp_param),
            "uses_fsdp_storage": same_storage(weight, unsharded_of(fsdp_param)),
        }
    )


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    """The probe's stages, then its control in every case (a forward that raised is a
    finding too): see ``quant_state_loss_control`` for what it separates, and why."""
    from fsdpqdiag.probes.common import build_linear4bit

    cfg = LinearConfig(**config)
    linear, x = build_linear4bit(cfg, ctx.device)
    evidence, original = _stages(linear, x, cfg, ctx)
    ctx.checkpoint(f"control: {CONTROL}", evidence)
    evidence["controls"] = {CONTROL: plain_subclass_control(original, ctx, cfg)}
    return evidence


def _stages(linear, x, cfg: LinearConfig, ctx) -> tuple[dict[str, Any], Any]:
    """The probe's evidence, and the packed weight's bytes as the first forward left them."""
    from fsdpqdiag.evidence.bytes import output_delta, plain
    from fsdpqdiag.probes.common import shard

    original_quant_state = getattr(linear.weight, "quant_state", None)
    baseline = linear(x).detach().clone()
    original = plain(linear.weight).clone()
    evidence: dict[str, Any] = {
        "shape": list(original.shape),
        "elements": original.numel(),
        # bitsandbytes >= 0.43 keeps a second reference on the module: recovery's only source.
        "module_keeps_quant_state": getattr(linear, "quant_state", None) is not None,
    }

    ctx.checkpoint("fully_shard", evidence)
    shard(linear, ctx, cfg)
    fsdp_param = fsdp_param_of(linear, "weight")
    sharded = linear.weight
    local = getattr(sharded, "_local_tensor", None)
    evidence["sharded"] = {
        "type": type(sharded).__name__,
        "local_type": type(local).__name__ if local is not None else None,
        "has_quant_state": getattr(sharded, "quant_state", None) is not None
        or getattr(local, "quant_state", None) is not None,
        "is_fsdp_sharded_param": fsdp_param is not None and sharded is fsdp_param.sharded_param,
    }

    ctx.checkpoint("forward after fully_shard", evidence)
    first = observe_forward(linear, x, fsdp_param)
    evidence["forward_weight"] = first.handed
    evidence["forward"] = {"status": "raised" if first.error else "completed", "error": first.error}
    evidence["recovery"] = {
        # None: forward failed before the weight reached it, so nothing is known of it.
        "needed": None if first.handed["type"] is None else not first.handed["has_quant_state"],
        "restored": first.used["has_quant_state"],
        "quant_state_is_module_copy": first.used["quant_state_is_module_copy"],
        "quant_state_is_original": original_quant_state is not None
        and first.used_quant_state is original_quant_state,
        "replaced_module_weight": not first.used["is_fsdp_unsharded_param"],
        "replacement_type": first.used["type"],
        "uses_fsdp_storage": first.used["uses_fsdp_storage"],
    }
    if first.error:
        return evidence, original
    evidence.update(output_delta(baseline, first.output))
    evidence["after_forward"] = {
        "module_weight_is_fsdp_unsharded_param": first.used["is_fsdp_unsharded_param"],
        "fsdp_state": str(getattr(fsdp_param, "sharded_state", None)).rsplit(".", 1)[-1],
    }

    ctx.checkpoint("reshard", evidence)
    evidence["after_reshard"] = _stage_reshard(linear, fsdp_param, first)
    ctx.checkpoint("update the shard, forward again", evidence)
    evidence["after_update"] = _stage_update(linear, x, fsdp_param, first, original, cfg, ctx)
    if "error" in evidence["after_update"]:
        return evidence, original
    linear.reshard()
    return evidence, original


def _stage_reshard(linear, fsdp_param, first: ForwardObservation) -> dict[str, Any]:
    """After reshard: is the unsharded storage freed, or does the forward's weight live on?"""
    import gc

    linear.reshard()
    gc.collect()
    retained = first.used_ref()
    unsharded = unsharded_of(fsdp_param)
    after_reshard = {
        "module_weight_is_fsdp_sharded_param": fsdp_param is not None
        and linear.weight is fsdp_param.sharded_param,
        "fsdp_unsharded_storage_bytes": storage_bytes(unsharded) if unsharded is not None else None,
        # Alive after gc means something besides this probe still references it.
        "forward_weight_retained": retained is not None,
        "retained_storage_bytes": storage_bytes(retained) if retained is not None else 0,
    }
    after_reshard["memory_freed"] = (
        not after_reshard["fsdp_unsharded_storage_bytes"] and not after_reshard["retained_storage_bytes"]
    )
    del retained, unsharded
    return after_reshard


def _stage_update(linear, x, fsdp_param, first: ForwardObservation, original, cfg, ctx) -> dict[str, Any]:
    """Update the shard in place, forward again: does forward use the update or a stale copy?
    ``{"error": ...}`` where that forward raised."""
    import torch

    from fsdpqdiag.evidence.bytes import output_delta, plain
    from fsdpqdiag.probes.common import build_linear4bit, local_shard_of

    # An optimizer step writes the sharded parameter in place; reversing each rank's rows
    # is such a write that is recognizable and adds no bit pattern the weight lacked.
    with torch.no_grad():
        shard_rows = plain(fsdp_param.sharded_param if fsdp_param is not None else linear.weight)
        shard_rows.copy_(shard_rows.flip(0))
    updated = torch.cat([local_shard_of(original, r, ctx.world_size).flip(0) for r in range(ctx.world_size)])
    second = observe_forward(linear, x, fsdp_param)
    if second.error:
        return {"error": second.error}
    used_differs = differing_elements(second.handed_bytes, second.used_bytes)
    updated_elements = differing_elements(original, updated)
    # A copy taken before the update matches what FSDP2 hands in until the shard changes:
    # staleness is measurable only if the update changed something or it already shows.
    stale = used_differs > 0 if (used_differs or updated_elements) else None
    after_update: dict[str, Any] = {
        "updated_elements": updated_elements,
        "handed_differs_from_update": differing_elements(updated, second.handed_bytes),
        "used_differs_from_handed": used_differs,
        "uses_fsdp_storage": second.used["uses_fsdp_storage"],
        "stale": stale,
        "output_bit_equal_to_first_forward": bool(torch.equal(second.output, first.output)),
    }
    reference, _ = build_linear4bit(cfg, ctx.device)
    with torch.no_grad():
        plain(reference.weight).copy_(updated)
    reference_delta = output_delta(reference(x).detach(), second.output)
    after_update["output_bit_equal_to_reference"] = reference_delta["output_bit_equal"]
    after_update["max_abs_delta_to_reference"] = reference_delta["max_abs_delta"]
    return after_update


def _problems(evidence: dict) -> tuple[list[str], list[str]]:
    """(quant_state findings, ownership findings) of one rank, as phrases."""
    lost, ownership = [], []
    recovery = evidence.get("recovery", {})
    if recovery.get("needed") and not recovery.get("restored"):
        source = "" if evidence.get("module_keeps_quant_state") else " (the module holds no copy)"
        lost.append(f"bitsandbytes' recovery did not restore it{source}")
    reshard = evidence.get("after_reshard", {})
    if reshard and not reshard.get("module_weight_is_fsdp_sharded_param"):
        ownership.append("module.weight is not FSDP2's sharded parameter after reshard")
    if reshard and not reshard.get("memory_freed"):
        kept = (reshard.get("fsdp_unsharded_storage_bytes") or 0) + reshard.get("retained_storage_bytes", 0)
        ownership.append(f"{kept} bytes of the unsharded weight stay allocated after reshard")
    update = evidence.get("after_update", {})
    if update.get("stale"):
        ownership.append(
            f"after an update of the shard, forward computed with {update['used_differs_from_handed']} "
            "elements that differ from what FSDP2 all-gathered (stale data)"
        )
    return lost, ownership


def _agreement_key(evidence: dict) -> tuple:
    return (
        evidence.get("forward_weight", {}).get("has_quant_state"),
        tuple(sorted(evidence.get("recovery", {}).items())),
        evidence.get("output_bit_equal"),
        tuple(sorted((evidence.get("after_reshard") or {}).items())),
        (evidence.get("after_update") or {}).get("stale"),
    )


def verdict(outcomes: list[RankOutcome]) -> Verdict:
    failed = failure_verdict(outcomes)
    if failed is not None:
        return failed
    evidence = dict(outcomes[0].evidence)
    evidence["ranks_agree"] = ranks_agree(outcomes, _agreement_key)
    lost, ownership = [], []
    for outcome in outcomes:
        rank_lost, rank_ownership = _problems(outcome.evidence)
        lost += [p for p in rank_lost if p not in lost]
        ownership += [p for p in rank_ownership if p not in ownership]
    handed, recovery = evidence["forward_weight"], evidence["recovery"]
    errors = [o.evidence["forward"]["error"] for o in outcomes if o.evidence["forward"]["error"]]
    seen = (
        f"forward receives a {handed['type']} "
        f"{'with' if handed['has_quant_state'] else 'without'} quant_state"
    )
    if lost or ownership:
        raised = f"; forward raised {errors[0]}" if errors else ""
        return Verdict(REPRODUCED, f"{seen}; " + "; ".join(lost + ownership) + raised, evidence)
    if errors:
        return Verdict(INCONCLUSIVE, f"{seen}, yet forward raised {errors[0]}", evidence)
    if recovery["needed"]:
        how = (
            f"bitsandbytes' recovery restored it and replaced module.weight with a "
            f"{recovery['replacement_type']} "
            f"{'sharing' if recovery['uses_fsdp_storage'] else 'not sharing'} FSDP2's unsharded storage"
            if recovery["replaced_module_weight"]
            else "bitsandbytes' recovery restored it in place"
        )
    else:
        how = "no recovery was needed"
    update = evidence["after_update"]
    fresh = (
        "the forward after an update of the shard used the all-gathered update"
        if update.get("stale") is False
        else "the update changed no element, so staleness is untested"
    )
    # Bytes FSDP2 itself altered are another probe's finding; say so rather than hide it.
    altered = (
        ""
        if all(o.evidence.get("output_bit_equal") for o in outcomes)
        else f"; the output differs from the unsharded layer's (max |Δy| = {evidence.get('max_abs_delta')}: "
        "bytes altered on the way in, see nan-canonicalization)"
    )
    return Verdict(
        NOT_REPRODUCED,
        f"{seen}; {how}; reshard restored the sharded parameter and freed the storage; {fresh}{altered}",
        evidence,
    )


def attribute(evidence: dict) -> tuple[str, list[str]]:
    """The control decides (see ``quant_state_loss_control``): a finding the plain subclass
    parameter shares, with nothing reassigning its ``module.weight``, is FSDP2's; so is a
    recovery left without its source by ``fully_shard``. Otherwise the loss is FSDP2's
    documented swap and what failed after it is bitsandbytes' recovery."""
    from fsdpqdiag.evidence import attribution

    control = (evidence.get("controls") or {}).get(CONTROL)
    if "recovery" not in evidence or control is None:
        return attribution.UNDETERMINED, [f"the run ended in {evidence.get('stage') or 'setup'}"]
    if control["outcome"] == "raised":
        return attribution.UNDETERMINED, [f"control {CONTROL} raised {control['exception']}"]
    lost, ownership = _problems(evidence)
    findings = control["findings"]
    said = (
        "control: the same bits in a Parameter subclass with a quant_state attribute, no "
        f"bitsandbytes, same fully_shard cycle: forward received a {control['handed_type']} "
        f"{'with' if control['handed_has_quant_state'] else 'without'} the attribute, the module's "
        f"copy {'survived' if control['module_copy_survives'] else 'was lost'}, FSDP2 "
        + ("kept the weight its own" if control["outcome"] == "kept" else "failed: " + "; ".join(findings))
    )
    if ownership and control["outcome"] == "broken":
        return attribution.TORCH_FSDP, [said, *(f"shared by the control: {p}" for p in ownership)]
    if lost and not control["module_copy_survives"]:
        return attribution.TORCH_FSDP, [said, "fully_shard removed the module copy the recovery reads"]
    if lost or ownership:
        recovery = "bitsandbytes' fix_4bit_weight_quant_state_from_module"
        return attribution.BITSANDBYTES, [said, *(f"{recovery}: {phrase}" for phrase in lost + ownership)]
    return attribution.UNDETERMINED, [said, "the recovery kept quant_state and FSDP2's storage"]


def key_numbers(evidence: dict) -> str:
    """How a result reads: what forward got, what the recovery did, and after."""
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


PROBE = Probe(
    name="quant-state-loss",
    description="Linear4bit under fully_shard: quant_state kept or recovered, weight still FSDP2's?",
    run=run,
    verdict=verdict,
    needs=Needs(),
    standalone="reproducers/quant_state_loss.py",
    attribute=attribute,
    # The first two break bitsandbytes' recovery only; the third FSDP2's reshard for every
    # parameter, which the same-launch control must then share (-> torch).
    controls=("drop-module-quant-state", "stale-recovered-weight", "keep-unsharded-after-reshard"),
    presentation=Presentation(
        key_numbers,
        reads=frozenset({"forward_weight", "recovery", "after_reshard", "after_update", "forward"}),
    ),
)
