"""bitsandbytes' in-place CPU repack of a ``Linear4bit`` weight, under FSDP2.

On a CPU with AVX512-BF16, ``Linear4bit.forward`` in inference (module not training, input
without grad) rewrites ``self.weight.data`` into a CPU-blocked layout and marks the module's
``QuantState`` ``packing_format_for_cpu``. Under ``fully_shard`` that weight is FSDP2's
unsharded parameter: its storage is re-made from the shards at every unshard, while the
``QuantState`` (and its flag) outlives it. The probe forwards twice, with a reshard between,
and asks: does forward receive the original bytes each time, do the shards keep them, and
does each output match the same layer without FSDP2 on the same kernel path?

Two controls run in the same rank and differ in one thing each: the same layer without
FSDP2 (two forwards, same path), and the same layer under FSDP2 with the repack switched off.
``envvars.BNB_CPU_REPACK=on`` takes the repack path on any CPU (see ``bnb_cpu_path``).
"""

from __future__ import annotations

import copy
from typing import Any

from fsdpqdiag.core.config import LinearConfig
from fsdpqdiag.core.outcome import RankOutcome
from fsdpqdiag.core.presentation import Presentation
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict, ranks_agree
from fsdpqdiag.report.model import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED

FORWARDS = 2
BYTE_KEYS = ("bytes_equal", "differing_elements", "differing_bytes", "post_bit_patterns")


def _forward_twice_without_fsdp(linear, x) -> dict[str, Any]:
    import torch

    from fsdpqdiag.evidence.bytes import output_delta
    from fsdpqdiag.stack import bnb_cpu_path

    with torch.no_grad():
        outputs = [linear(x).detach().clone() for _ in range(FORWARDS)]
    return {
        "outputs": outputs,
        "repacked": bool(bnb_cpu_path.repacked(linear)),
        "stable": output_delta(outputs[0], outputs[-1])["output_bit_equal"],
    }


def _forward_under_fsdp(linear, x, original, reference, ctx) -> list[dict[str, Any]]:
    """Forward, record, reshard; ``FORWARDS`` times. Each record: what forward received,
    what it returned against ``reference``, the layer's state after it, the shard after
    reshard."""
    import torch

    from fsdpqdiag.evidence.bytes import diff, output_delta
    from fsdpqdiag.probes.common import capture_forward_weight, local_shard_of
    from fsdpqdiag.stack import bnb_cpu_path

    records = []
    for _ in range(FORWARDS):
        captured, handle = capture_forward_weight(linear)
        with torch.no_grad():
            out = linear(x).detach().clone()
        handle.remove()
        unsharded = linear.weight
        record: dict[str, Any] = {
            "received": {k: diff(original, captured.tensor).get(k) for k in BYTE_KEYS},
            "weight_after_forward": {"dtype": str(unsharded.dtype), "shape": list(unsharded.shape)},
            "repacked_after_forward": bool(bnb_cpu_path.repacked(linear)),
            **output_delta(reference, out),
        }
        linear.reshard()
        shard = local_shard_of(original, ctx.rank, ctx.world_size)
        record["local_tensor_after_reshard"] = {
            k: diff(shard, linear.weight._local_tensor).get(k) for k in BYTE_KEYS
        }
        records.append(record)
    return records


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    from fsdpqdiag.evidence.bytes import plain
    from fsdpqdiag.probes.common import build_linear4bit, shard
    from fsdpqdiag.stack import bnb_cpu_path

    cfg = LinearConfig(**config)
    linear, x = build_linear4bit(cfg, ctx.device)
    linear.eval()
    # Copies taken before any forward: the first inference forward rewrites the weight.
    original = plain(linear.weight).clone()
    without_fsdp = copy.deepcopy(linear)
    repack_off = copy.deepcopy(linear)
    repack_off.support_avx512bf16_for_cpu = False
    evidence: dict[str, Any] = {
        "elements": original.numel(),
        "shape": list(original.shape),
        "cpu_path": bnb_cpu_path.describe(),
        "repack_path": bool(getattr(linear, "support_avx512bf16_for_cpu", False)),
    }

    ctx.checkpoint("control: forward without fully_shard", evidence)
    control = _forward_twice_without_fsdp(without_fsdp, x)
    reference = control.pop("outputs")[0]
    outcome = "stable" if control["stable"] else "unstable"
    evidence["controls"] = {"without_fsdp": {"outcome": outcome, **control}}

    ctx.checkpoint("fully_shard", evidence)
    shard(linear, ctx, cfg)
    ctx.checkpoint("forward, reshard, forward under fully_shard", evidence)
    evidence["forwards"] = _forward_under_fsdp(linear, x, original, reference, ctx)

    ctx.checkpoint("control: fully_shard with the repack off", evidence)
    off_reference = _forward_twice_without_fsdp(copy.deepcopy(repack_off), x)["outputs"][0]
    shard(repack_off, ctx, cfg)
    off_records = _forward_under_fsdp(repack_off, x, original, off_reference, ctx)
    evidence["controls"]["fsdp_repack_off"] = {
        "outcome": "stable" if all(r["output_bit_equal"] for r in off_records) else "unstable",
        "output_bit_equal": [r["output_bit_equal"] for r in off_records],
        "received_bytes_equal": [r["received"]["bytes_equal"] for r in off_records],
    }
    return evidence


def _agreement_key(evidence: dict) -> tuple:
    return tuple(
        (f["received"]["differing_elements"], f["max_abs_delta"], f["repacked_after_forward"])
        for f in evidence.get("forwards", [])
    )


def attribute(evidence: dict) -> tuple[str, list[str]]:
    """The layer without FSDP2 and FSDP2 with the repack off are each stable only if the
    fault needs both: bitsandbytes' layout flag outliving FSDP2's per-unshard storage."""
    from fsdpqdiag.evidence import attribution

    controls = evidence.get("controls") or {}
    outcomes = {name: controls.get(name, {}).get("outcome") for name in ("without_fsdp", "fsdp_repack_off")}
    decided_by = [
        f"control without fully_shard, same kernel path: {outcomes['without_fsdp']}",
        f"control under fully_shard with the repack off: {outcomes['fsdp_repack_off']}",
    ]
    forwards = evidence.get("forwards") or []
    if not forwards:
        return attribution.UNDETERMINED, [*decided_by, "no forward under fully_shard completed"]
    if not all(f["received"]["bytes_equal"] for f in forwards):
        # Bytes changed on their way into forward: FSDP2's unshard, not bitsandbytes' layout.
        return attribution.TORCH_FSDP, [*decided_by, "forward received altered bytes"]
    isolated = all(outcome == "stable" for outcome in outcomes.values())
    component = attribution.BITSANDBYTES if isolated else attribution.UNDETERMINED
    return component, [*decided_by, "forward received every original byte each time"]


def verdict(outcomes: list[RankOutcome]) -> Verdict:
    measured = [o for o in outcomes if "fsdp_repack_off" in o.evidence.get("controls", {})]
    if len(measured) < len(outcomes):
        failed = failure_verdict(outcomes, keep_evidence=True)
        if failed is not None:
            return failed
    evidence = dict(measured[0].evidence)
    evidence["ranks_agree"] = ranks_agree(measured, _agreement_key)
    forwards = [f for o in measured for f in o.evidence["forwards"]]
    bytes_altered = not all(
        f["received"]["bytes_equal"] and f["local_tensor_after_reshard"]["bytes_equal"] for f in forwards
    )
    wrong = sorted(
        {i for o in measured for i, f in enumerate(o.evidence["forwards"]) if not f["output_bit_equal"]}
    )
    path = "repack path" if evidence["repack_path"] else "dequantize path"
    outputs = ", ".join(
        f"forward {i + 1}: max |Δy| = {f['max_abs_delta']}" for i, f in enumerate(evidence["forwards"])
    )
    received = "forward received " + ("altered bytes" if bytes_altered else "every original byte")
    detail = f"{path}; {received}; {outputs}"
    if not wrong and not bytes_altered:
        return Verdict(NOT_REPRODUCED, f"{detail}; outputs bit-equal to the layer without FSDP2", evidence)
    if evidence["controls"]["without_fsdp"]["outcome"] != "stable":
        return Verdict(INCONCLUSIVE, f"{detail}; the layer without FSDP2 is unstable too", evidence)
    first = wrong[0] + 1 if wrong else None
    where = f"output wrong from forward {first}" if first else "output bit-equal"
    flag = (
        "; the module's QuantState stays marked packing_format_for_cpu while FSDP2 hands forward "
        "the original layout"
        if evidence["forwards"][-1]["repacked_after_forward"] and not bytes_altered
        else ""
    )
    return Verdict(REPRODUCED, f"{detail}; {where}{flag}", evidence)


def key_numbers(evidence: dict) -> str:
    """How a result reads: which path bitsandbytes took, and each forward."""
    if "forwards" not in evidence:  # the run ended before its forwards
        return ""  # the verdict line says why
    path = "repack" if evidence.get("repack_path") else "dequantize"
    return f"{path} path; " + "; ".join(
        f"forward {i + 1}: bytes equal {f['received']['bytes_equal']}, max |Δy| {f['max_abs_delta']}"
        for i, f in enumerate(evidence["forwards"])
    )


PROBE = Probe(
    name="cpu-weight-repack",
    description="bitsandbytes' in-place CPU weight repack under FSDP2: bytes and output across forwards",
    run=run,
    verdict=verdict,
    needs=Needs(devices=("cpu",)),
    standalone="reproducers/cpu_weight_repack.py",
    attribute=attribute,
    # On the path where nothing breaks (``envvars.BNB_CPU_REPACK=off``), it must flip the probe.
    controls=("nan-canonicalize",),
    presentation=Presentation(key_numbers, reads=frozenset({"forwards", "repack_path"})),
)
