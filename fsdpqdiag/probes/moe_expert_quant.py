"""issue 6, probe 5: MoE experts stored as fused 3-D parameters, quantized through
``torch.nn.utils.parametrize`` (bitsandbytes' parametrize API, as axolotl #3439 does on
load), LoRA on the attention, ``fully_shard`` per decoder layer and at the root.

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

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from fsdpqdiag.config import LinearConfig
from fsdpqdiag.outcome import RankOutcome
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict, ranks_agree
from fsdpqdiag.report import INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, SKIPPED

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
LORA_TARGETS = ("q_proj", "v_proj")
PRE_SHARD_STAGES = ("build model", "LoRA", "quantize experts", "baseline forward", "baseline backward")
# Knobs beyond LinearConfig (whose in/out_features this fixed-geometry model ignores); the
# defaults are what `fsdpqdiag reproduce` runs.
KNOBS: dict[str, Any] = {"expert_bits": 4, "lora": True, "seq_len": 16}
STORAGE_VIEWS = ("forward", "local", "unsharded")


def split_config(config: dict[str, Any]) -> tuple[LinearConfig, dict[str, Any]]:
    fields = {f.name for f in dataclasses.fields(LinearConfig)}
    unknown = sorted(set(config) - fields - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown moe-expert-quant config keys {unknown} (knobs: {', '.join(KNOBS)})")
    linear = LinearConfig(**{k: v for k, v in config.items() if k in fields})
    return linear, {**KNOBS, **{k: v for k, v in config.items() if k in KNOBS}}


def parametrize_quantizer(bits: int):
    """bitsandbytes' parametrize function for ``bits``-bit experts, or why there is none."""
    import bitsandbytes

    try:
        from bitsandbytes.nn import parametrize
    except ImportError as exc:
        return None, f"bitsandbytes {bitsandbytes.__version__} has no bitsandbytes.nn.parametrize ({exc})"
    name = f"replace_parameter_{bits}bit"
    function = getattr(parametrize, name, None)
    if function is None:
        offered = sorted(n for n in dir(parametrize) if n.startswith("replace_parameter"))
        return None, (
            f"bitsandbytes {bitsandbytes.__version__} has no {bits}-bit parametrize API "
            f"(no bitsandbytes.nn.parametrize.{name}; it offers {', '.join(offered) or 'nothing'})"
        )
    return function, None


class Stages:
    """Runs each stage under a checkpoint; a stage that raises is recorded, not re-raised.

    ``at(...)`` names what a stage is working on (the layer being sharded, the parameter
    being quantized) so that a failure says where it arose even when the traceback does
    not pass through a module of the model.
    """

    def __init__(self, ctx, evidence: dict[str, Any]):
        self.ctx = ctx
        self.evidence = evidence
        self.module_names: dict[int, str] = {}
        self.current: dict[str, str] = {}
        evidence.setdefault("stages", {})
        evidence.setdefault("failures", [])

    def name_modules(self, model) -> None:
        self.module_names = {id(module): name or "(root)" for name, module in model.named_modules()}

    def at(self, **where: str) -> None:
        self.current = where

    def ok(self, *names: str) -> bool:
        return all(self.evidence["stages"].get(name) == "ok" for name in names)

    def skip(self, name: str, reason: str) -> None:
        self.evidence["stages"][name] = f"skipped: {reason}"

    @contextlib.contextmanager
    def run(self, name: str):
        self.ctx.checkpoint(name, self.evidence)
        self.current = {}
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - what the stack under test raises is evidence
            self.evidence["stages"][name] = "failed"
            self.evidence["failures"].append(
                {"stage": name, **where_raised(exc, self.module_names), "while": dict(self.current)}
            )
        else:
            self.evidence["stages"][name] = "ok"


def where_raised(exc: BaseException, module_names: dict[int, str]) -> dict[str, Any]:
    """The exception, the innermost module of the model its traceback passes through, and
    the innermost frame (where the stack actually raised)."""
    module = module_type = frame = None
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        owner = tb.tb_frame.f_locals.get("self")
        if owner is not None and id(owner) in module_names:
            module, module_type = module_names[id(owner)], type(owner).__name__
        frame = f"{Path(code.co_filename).name}:{tb.tb_lineno} in {code.co_name}"
        tb = tb.tb_next
    message = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return {
        "exception": message[0][:500] if message else type(exc).__name__,
        "module": module,
        "module_type": module_type,
        "frame": frame,
    }


def compact(comparison: dict[str, Any]) -> dict[str, Any]:
    """A byte diff without its position list (its hash stays): four per rank add up."""
    return {k: v for k, v in comparison.items() if k not in ("positions", "positions_truncated")}


def aggregate(experts: dict[str, dict], view: str) -> dict[str, Any] | None:
    """One view (forward / local / unsharded) summed over every expert tensor."""
    diffs = [entry[view] for entry in experts.values() if view in entry]
    if not diffs:
        return None
    changed_form = [d["reason"] for d in diffs if not d.get("comparable", True)]
    return {
        "tensors": len(diffs),
        "comparable": not changed_form,
        "changed_form": changed_form[0] if changed_form else None,
        "bytes_equal": all(d.get("bytes_equal") for d in diffs),
        "elements": sum(d.get("elements", 0) for d in diffs),
        "differing_elements": sum(d.get("differing_elements", 0) for d in diffs),
        "differing_bytes": sum(d.get("differing_bytes", 0) for d in diffs),
    }


def grad_comparison(model, baseline: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """Each LoRA gradient after FSDP2's backward (this rank's shard) against the same rows
    of the baseline gradient: present, finite, bit-equal?"""
    import torch

    from fsdpqdiag.bytes import plain
    from fsdpqdiag.probes.common import local_shard_of

    missing, differing, nonfinite, bit_equal, max_delta = [], [], 0, 0, 0.0
    for name, param in model.named_parameters():
        if name not in baseline:
            continue
        if param.grad is None:
            missing.append(name)
            continue
        local = plain(param.grad)
        expected = local_shard_of(baseline[name], rank, world_size).to(local.device)
        nonfinite += int((~torch.isfinite(local)).sum())
        if local.dtype == expected.dtype and torch.equal(local, expected):
            bit_equal += 1
            continue
        differing.append(name)
        if local.shape == expected.shape:
            delta = (local.float() - expected.float()).abs()
            finite = delta[torch.isfinite(delta)]
            if finite.numel():
                max_delta = max(max_delta, float(finite.max()))
    return {
        "trainable": len(baseline),
        "with_grad": len(baseline) - len(missing),
        "missing": missing,
        "nonfinite_elements": nonfinite,
        "bit_equal": bit_equal,
        "differing": differing,
        "max_abs_delta": max_delta,
    }


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    import torch

    from fsdpqdiag.bytes import diff, output_delta, plain, sha256
    from fsdpqdiag.models import TINY_MOE, build_tiny_moe, decoder_layers, fixed_input
    from fsdpqdiag.probes.common import local_shard_of, plain_integer_control, shard

    cfg, knobs = split_config(config)
    bits = knobs["expert_bits"]
    evidence: dict[str, Any] = {
        "model": {"architecture": "Qwen3MoeForCausalLM", **TINY_MOE, "dtype": cfg.compute_dtype},
        "quantization": {
            "api": f"bitsandbytes.nn.parametrize.replace_parameter_{bits}bit",
            "bits": bits,
            "quant_type": cfg.quant_type,
            "compress_statistics": cfg.double_quant,
        },
        "lora": {"enabled": bool(knobs["lora"]), "targets": list(LORA_TARGETS)},
        "seq_len": knobs["seq_len"],
        "experts": {},
    }
    quantize, unavailable = parametrize_quantizer(bits)
    if bits == 4:
        _, eight_bit_missing = parametrize_quantizer(8)
        evidence["eight_bit"] = (
            {"status": "skipped", "reason": eight_bit_missing}
            if eight_bit_missing
            else {"status": "available", "reason": "run with expert_bits=8"}
        )
    if quantize is None:
        evidence["skipped"] = unavailable
        return evidence
    import transformers

    if not hasattr(transformers, "Qwen3MoeForCausalLM"):
        evidence["skipped"] = f"transformers {transformers.__version__} has no Qwen3MoeForCausalLM"
        return evidence

    # The same fully_shard of plain frozen integer parameters, without bitsandbytes or
    # parametrize: what FSDP2 does to integer storage by itself.
    evidence["controls"] = {"plain_integer_parameters": plain_integer_control(cfg, ctx, evidence)}
    stages = Stages(ctx, evidence)
    with stages.run("build model"):
        model = build_tiny_moe(cfg.weight_seed, cfg.compute_dtype)
    if not stages.ok("build model"):
        return evidence
    layers = decoder_layers(model)
    experts_modules = [layer.mlp.experts for layer in layers]
    fused = all(
        isinstance(getattr(experts, name, None), torch.nn.Parameter) and getattr(experts, name).dim() == 3
        for experts in experts_modules
        for name in EXPERT_PARAMS
    )
    if not fused:
        evidence["skipped"] = (
            f"transformers {transformers.__version__} does not store Qwen3-MoE experts as fused 3-D "
            f"parameters ({type(experts_modules[0]).__name__} has no 3-D {' / '.join(EXPERT_PARAMS)})"
        )
        return evidence
    trainable: list[str] = []
    if knobs["lora"]:
        with stages.run("LoRA"):
            from peft import LoraConfig, get_peft_model

            torch.manual_seed(cfg.weight_seed)
            lora = LoraConfig(
                r=8,
                lora_alpha=16,
                lora_dropout=0.0,
                target_modules=list(LORA_TARGETS),
                # Random A and B: with B = 0 (peft's default) A's gradient is zero and the
                # adapter leaves the loss untouched, so neither would test anything.
                init_lora_weights=False,
            )
            # Adapters stay in the model dtype: the bf16 MixedPrecisionPolicy then casts
            # nothing, and a loss that moves is FSDP2's doing, not mixed precision's.
            model = get_peft_model(model, lora, autocast_adapter_dtype=False)
            trainable = [name for name, p in model.named_parameters() if p.requires_grad]
            evidence["lora"]["trainable_params"] = len(trainable)
        if not stages.ok("LoRA"):
            return evidence
    else:
        stages.skip("LoRA", "disabled")
    # Weights and LoRA are drawn on the CPU (same numbers on every device); quantization
    # happens on the rank's device, as it does on load in training.
    model = model.to(ctx.device)
    stages.name_modules(model)

    parametrizations: dict[str, Any] = {}
    originals: dict[str, Any] = {}
    with stages.run("quantize experts"):
        for index, experts in enumerate(experts_modules):
            for name in EXPERT_PARAMS:
                key = f"layers.{index}.mlp.experts.{name}"
                stages.at(module=stages.module_names.get(id(experts), key), parameter=name)
                fused_shape = list(getattr(experts, name).shape)
                if bits == 4:
                    quantize(experts, name, compress_statistics=cfg.double_quant, quant_type=cfg.quant_type)
                else:  # an 8-bit API, once bitsandbytes has one: its defaults, as axolotl's
                    quantize(experts, name)
                holder = getattr(experts.parametrizations, name)
                storage = plain(holder.original)
                parametrizations[key] = holder
                originals[key] = storage.clone()
                evidence["experts"][key] = {
                    "fused_shape": fused_shape,
                    "storage_dtype": str(storage.dtype).removeprefix("torch."),
                    "storage_shape": list(storage.shape),
                    "parametrization": type(holder[0]).__name__,
                    "sha256": sha256(storage),
                }
    if not stages.ok("quantize experts"):
        return evidence
    stages.name_modules(model)

    input_ids = fixed_input(TINY_MOE["vocab_size"], cfg.batch, knobs["seq_len"], cfg.input_seed).to(
        ctx.device
    )
    with stages.run("baseline forward"):
        baseline_loss = model(input_ids=input_ids, labels=input_ids).loss
        evidence["baseline_loss"] = baseline_loss.item()
    if not stages.ok("baseline forward"):
        return evidence
    baseline_grads: dict[str, Any] = {}
    if trainable:
        with stages.run("baseline backward"):
            baseline_loss.backward()
            params = dict(model.named_parameters())
            baseline_grads = {
                n: params[n].grad.detach().clone() for n in trainable if params[n].grad is not None
            }
            evidence["baseline_grads"] = {
                "trainable": len(trainable),
                "with_grad": len(baseline_grads),
                "nonfinite_elements": sum(int((~torch.isfinite(g)).sum()) for g in baseline_grads.values()),
                "abs_sum": sum(float(g.float().abs().sum()) for g in baseline_grads.values()),
            }
            model.zero_grad(set_to_none=True)
        if not stages.ok("baseline backward"):
            return evidence
    else:
        stages.skip("baseline backward", "no trainable parameters")
    baseline_loss = baseline_loss.detach()

    with stages.run("fully_shard"):
        for layer in decoder_layers(model):
            stages.at(module=stages.module_names.get(id(layer), "?"))
            shard(layer, ctx, cfg)
        stages.at(module="(root)")
        shard(model, ctx, cfg)
    if not stages.ok("fully_shard"):
        return evidence
    for key, holder in parametrizations.items():
        evidence["experts"][key]["sharded_type"] = type(holder.original).__name__
        expected = local_shard_of(originals[key], ctx.rank, ctx.world_size)
        evidence["experts"][key]["local"] = compact(diff(expected, plain(holder.original)))

    # What dequantize_4bit receives in forward: FSDP2 has swapped the unsharded storage in
    # by then, so this is the expert analogue of Linear4bit's swap target.
    captured: dict[str, Any] = {}
    handles = []
    for key, holder in parametrizations.items():

        def capture(module, args, key=key):
            if key not in captured:
                captured[key] = plain(args[0]).clone()

        handles.append(holder[0].register_forward_pre_hook(capture))
    with stages.run("forward after fully_shard"):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        evidence["loss"] = loss.item()
        evidence.update(output_delta(baseline_loss, loss.detach()))
    for handle in handles:
        handle.remove()
    for key, storage in captured.items():
        evidence["experts"][key]["forward"] = compact(diff(originals[key], storage))
    if stages.ok("forward after fully_shard") and trainable:
        with stages.run("backward after fully_shard"):
            loss.backward()
        if stages.ok("backward after fully_shard"):
            evidence["lora_grads"] = grad_comparison(model, baseline_grads, ctx.rank, ctx.world_size)
    elif not trainable:
        stages.skip("backward after fully_shard", "no trainable parameters")

    # Runs even after a failed forward: the stored bytes are evidence either way.
    with stages.run("unshard"):
        for index, layer in enumerate(decoder_layers(model)):
            stages.at(module=stages.module_names.get(id(layer), "?"))
            layer.unshard()
            for key in (k for k in parametrizations if k.startswith(f"layers.{index}.")):
                evidence["experts"][key]["unsharded"] = compact(
                    diff(originals[key], parametrizations[key].original)
                )
            layer.reshard()
    for view in STORAGE_VIEWS:
        evidence[f"expert_storage_{view}"] = aggregate(evidence["experts"], view)
    return evidence


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
    grads = [e["lora_grads"] for e in measured if "lora_grads" in e]
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
    from fsdpqdiag import attribution

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
)
