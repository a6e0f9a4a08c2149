"""Whole-model forensics: which quantized weights of a real model FSDP2 alters, and how much.

A real transformers causal LM is loaded through ``from_pretrained`` with bitsandbytes
quantization (optionally with PEFT LoRA), sharded per decoder layer and at the root, and
run on a fixed-seed input. For every quantized parameter the original bytes are compared
with the rank's ``_local_tensor``, with the tensor the module's forward actually receives
(captured by a pre-hook registered after ``fully_shard``) and with ``full_tensor()``; each
module's output is compared with its output without FSDP.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from fsdpqdiag.core.presentation import Presentation
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict, unfinished_rank
from fsdpqdiag.report.model import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED


@dataclass(frozen=True)
class ForensicsConfig:
    model: str
    bits: int = 4
    quant_type: str = "nf4"
    double_quant: bool = True
    quant_storage: str = "bfloat16"
    lora: bool = False
    batch: int = 2
    seq_len: int = 32
    input_seed: int = 123


def _hooks(model, targets: dict[str, Any], weights: dict, outputs: dict):
    from fsdpqdiag.evidence.bytes import plain

    handles = []
    for name, module in targets.items():

        def pre(mod, args, name=name) -> None:  # returning a value would replace the input
            weights.setdefault(name, plain(mod.weight).clone())

        def post(mod, args, out, name=name) -> None:
            outputs.setdefault(name, out.detach().float().clone())

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    return handles


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    import torch

    from fsdpqdiag.analyses.fingerprint import classify
    from fsdpqdiag.evidence.bytes import diff, plain
    from fsdpqdiag.probes.common import fsdp_api
    from fsdpqdiag.stack import bnb_cpu_path, models

    cfg = ForensicsConfig(**config)
    quant = models.QuantConfig(
        bits=cfg.bits,
        quant_type=cfg.quant_type,
        double_quant=cfg.double_quant,
        quant_storage=cfg.quant_storage,
    )
    model = models.load_quantized(cfg.model, quant, ctx.device)
    if cfg.lora:
        model = models.apply_lora(model)
    ids = models.fixed_input(model.config.vocab_size, cfg.batch, cfg.seq_len, cfg.input_seed).to(ctx.device)
    found = [
        (n.rsplit(".", 1)[0], m, k)
        for n, m, _, k in models.quantized_parameters(model)
        if n.endswith(".weight")
    ]
    targets = {name: module for name, module, _ in found}
    kinds = {name: kind for name, _, kind in found}
    original = {name: plain(module.weight).clone() for name, module in targets.items()}

    loss_before, base_outputs = _baseline(model, targets, ids)
    evidence: dict[str, Any] = {"loss_before": loss_before, "modules": []}
    ctx.checkpoint("fully_shard", evidence)
    fully_shard, MixedPrecisionPolicy = fsdp_api()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = models.decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=ctx.mesh(), mp_policy=policy)
    fully_shard(model, mesh=ctx.mesh(), mp_policy=policy)
    locals_ = {name: getattr(module.weight, "_local_tensor", None) for name, module in targets.items()}

    weights: dict = {}
    outputs: dict = {}
    handles = _hooks(model, targets, weights, outputs)
    ctx.checkpoint("forward after fully_shard", evidence)
    with torch.no_grad():
        loss_after = float(model(input_ids=ids, labels=ids).loss.float())
    for handle in handles:
        handle.remove()
    evidence["loss_after"] = loss_after
    evidence["loss_bit_equal"] = loss_before == loss_after
    # bitsandbytes' own in-place rewrite of the weight (AVX512-BF16 CPU path) happens inside
    # forward, after the pre-hook captured what forward received: the byte comparisons below
    # are like with like either way, and the report says which path was taken.
    evidence["bnb_cpu_repacked_modules"] = len(bnb_cpu_path.repacked(model))

    rows = [
        _module_row(name, before, kinds[name], weights, outputs, base_outputs, locals_.get(name), ctx)
        for name, before in original.items()
    ]
    evidence["modules"] = rows

    # Totals and fingerprint before full_tensor(): a rank that dies there (Mechanism B)
    # must not take the forward's evidence with it.
    altered = [r for r in rows if not (r["swap_target"].get("bytes_equal") or False)]
    evidence["totals"] = _totals(rows, altered)
    evidence["fingerprint"] = classify(altered[0]["swap_target"], ctx.device) if altered else None

    model.reshard()
    ctx.checkpoint(f"control: {CONTROL}", evidence)
    control = _plain_control(rows, original, policy, ctx)
    if control is not None:
        evidence["controls"] = {CONTROL: control}
    ctx.checkpoint("full_tensor()", evidence)
    for row in rows:
        weight = targets[row["module"]].weight
        if hasattr(weight, "full_tensor"):
            result = diff(original[row["module"]], weight.full_tensor())
            row["full_tensor"] = {k: result.get(k) for k in ("bytes_equal", "differing_elements")}
    evidence["full_tensor"] = {"status": "completed"}
    return evidence


# The same bits as the altered weights, in plain parameters through the same fully_shard.
CONTROL = "plain_parameters_same_bits"


def _plain_control(rows: list[dict], original: dict, policy, ctx) -> dict[str, Any] | None:
    """The control that differs only in bitsandbytes: each weight some rank saw altered, its
    very bits in a plain ``nn.Parameter`` of one module, through ``fully_shard`` with the
    same mesh and mixed-precision policy and one unshard. Runs only where a weight was
    altered (every rank agrees on which, so all enter the same collectives); None otherwise."""
    from fsdpqdiag.probes.common import agreed_flags, plain_carriers_control

    flags = agreed_flags([not r["swap_target"].get("bytes_equal") for r in rows], ctx.device)
    altered = {r["module"]: original[r["module"]] for r, flag in zip(rows, flags) if flag}
    if not altered:
        return None
    return plain_carriers_control(altered, ctx.mesh(), mp_policy=policy)


def _baseline(model, targets: dict, ids) -> tuple[float, dict]:
    """The loss and each target module's output of an unsharded copy of ``model``."""
    import torch

    baseline_model = copy.deepcopy(model)
    base_weights: dict = {}
    base_outputs: dict = {}
    handles = _hooks(
        baseline_model,
        {n: m for n, m in baseline_model.named_modules() if n in targets},
        base_weights,
        base_outputs,
    )
    with torch.no_grad():
        loss_before = float(baseline_model(input_ids=ids, labels=ids).loss.float())
    for handle in handles:
        handle.remove()
    del baseline_model
    return loss_before, base_outputs


def _module_row(name, before, kind, weights, outputs, base_outputs, local, ctx) -> dict[str, Any]:
    """One quantized module: what forward received against the original, its rank's shard,
    and its output against the baseline's."""
    from fsdpqdiag.evidence.bytes import diff, nan_census, output_delta
    from fsdpqdiag.probes.common import local_shard_of

    swap = diff(before, weights[name]) if name in weights else {"comparable": False, "reason": "not called"}
    row = {
        "module": name,
        "kind": kind,
        "shape": list(before.shape),
        "nan_elements": nan_census(before)["nan_elements"],
        "swap_target": {
            k: swap.get(k)
            for k in (
                "comparable",
                "bytes_equal",
                "differing_bytes",
                "differing_elements",
                "original_classes",
                "post_bit_patterns",
                "samples",
            )
        },
        "local_tensor": None
        if local is None
        else {
            k: v
            for k, v in diff(local_shard_of(before, ctx.rank, ctx.world_size), local).items()
            if k in ("bytes_equal", "differing_elements", "differing_bytes")
        },
    }
    if name in outputs and name in base_outputs:
        delta = output_delta(base_outputs[name], outputs[name])
        row.update({k: delta[k] for k in ("max_abs_delta", "mean_abs_delta", "output_bit_equal")})
    return row


def _totals(rows: list[dict], altered: list[dict]) -> dict[str, int]:
    return {
        "quantized_modules": len(rows),
        "nan_elements": sum(r["nan_elements"] for r in rows),
        "altered_modules": len(altered),
        "differing_elements": sum(r["swap_target"].get("differing_elements") or 0 for r in rows),
        "differing_bytes": sum(r["swap_target"].get("differing_bytes") or 0 for r in rows),
    }


def verdict(outcomes) -> Verdict:
    measured = [o for o in outcomes if "totals" in o.evidence]
    if len(measured) < len(outcomes):
        failed = failure_verdict(outcomes, keep_evidence=True)
        if failed is not None:
            return failed
    evidence = dict(measured[0].evidence)
    # A death inside full_tensor() is Mechanism B; the forward's evidence stands.
    unfinished = [o for o in outcomes if o.evidence.get("full_tensor", {}).get("status") != "completed"]
    ended = "full_tensor() completed on every rank"
    if unfinished:
        first = unfinished[0]
        evidence["full_tensor"] = unfinished_rank(first)
        ranks = ", ".join(str(o.rank) for o in unfinished)
        ended = f"full_tensor() did not complete: rank(s) {ranks} {first.signal or first.status}"
    totals = evidence["totals"]
    evidence["ranks_agree"] = len({str(o.evidence.get("totals")) for o in measured}) == 1
    loss = f"loss {evidence['loss_before']} -> {evidence['loss_after']}"
    detail = (
        f"{totals['altered_modules']} of {totals['quantized_modules']} quantized weights altered "
        f"({totals['differing_elements']} elements, {totals['nan_elements']} NaN-class in all); {loss}; "
        f"{ended}"
    )
    if totals["altered_modules"] and not evidence["loss_bit_equal"]:
        return Verdict(REPRODUCED, detail, evidence)
    if not totals["altered_modules"] and evidence["loss_bit_equal"]:
        return Verdict(NOT_REPRODUCED, detail, evidence)
    return Verdict(INCONCLUSIVE, detail, evidence)


def attribute(evidence: dict) -> tuple[str, list[str]]:
    """The control decides: the same bits in plain parameters through the same unshard
    altered too (FSDP2's unshard, whatever the parameter) or kept (only the bitsandbytes
    path alters them). The shards and the fingerprint say where and which conversion."""
    from fsdpqdiag.evidence import attribution

    rows = evidence.get("modules") or []
    altered = [r for r in rows if not r["swap_target"].get("bytes_equal")]
    if not altered:
        return attribution.UNDETERMINED, ["no weight altered; the loss moved elsewhere"]
    shards_true = all((r.get("local_tensor") or {}).get("bytes_equal") for r in altered)
    matches = (evidence.get("fingerprint") or {}).get("matches") or []
    evidence_said = [
        f"_local_tensor byte-true in {'all' if shards_true else 'not all'} {len(altered)} altered weights",
        "fingerprint: " + (", ".join(matches) or "no candidate conversion"),
    ]
    control = (evidence.get("controls") or {}).get(CONTROL)
    if control is None:
        stage = evidence.get("stage") or "setup"
        return attribution.UNDETERMINED, [f"the run ended in {stage} before its control ran", *evidence_said]
    result = (
        f"altered {control['differing_elements']} elements in {len(control['altered_weights'])} weights"
        if control["outcome"] == "altered"
        else "kept every byte"
    )
    said = (
        f"control: the same bits of the {control['weights']} altered weights in plain parameters "
        f"(no bitsandbytes), same fully_shard and unshard, {result}"
    )
    if control["outcome"] == "altered":
        return attribution.TORCH_FSDP, [said, *evidence_said]
    return attribution.BITSANDBYTES, [said, "only the Params4bit path altered bytes", *evidence_said]


def key_numbers(evidence: dict) -> str:
    """How a result reads: altered weights, the loss, and how full_tensor() ended."""
    if "totals" not in evidence:  # the ranks ended before the totals
        return ""  # the verdict line says why
    totals, ended = evidence["totals"], (evidence.get("full_tensor") or {})
    return (
        f"{totals['altered_modules']} of {totals['quantized_modules']} weights altered, "
        f"{totals['differing_elements']} elements; "
        f"loss {evidence.get('loss_before')} → {evidence.get('loss_after')}; "
        f"full_tensor(): {ended.get('signal') or ended.get('status')}"
    )


PROBE = Probe(
    name="forensics",
    description="per-module byte forensics of a real quantized causal LM under FSDP2",
    run=run,
    verdict=verdict,
    needs=Needs(packages=("bitsandbytes", "transformers")),
    attribute=attribute,
    presentation=Presentation(
        key_numbers, reads=frozenset({"totals", "full_tensor", "loss_before", "loss_after"})
    ),
)
