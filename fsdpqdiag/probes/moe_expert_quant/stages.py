"""moe-expert-quant's run (see its module), one function per stage: build, LoRA, quantize
the experts, the baseline without FSDP, fully_shard, forward, backward, unshard. Each runs
under ``Stages.run``, which records a stage the stack refuses instead of raising it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fsdpqdiag.core.config import LinearConfig
from fsdpqdiag.probes.moe_expert_quant.setup import (
    EXPERT_PARAMS,
    LORA_TARGETS,
    STORAGE_VIEWS,
    Stages,
    aggregate,
    compact,
    grad_comparison,
    parametrize_quantizer,
    split_config,
)


@dataclass
class _MoeRun:
    """What the stages of one run share: the config, where evidence goes, the model and
    what the baseline (no FSDP) measured for the later stages to compare with."""

    ctx: Any
    cfg: LinearConfig
    knobs: dict[str, Any]
    evidence: dict[str, Any]
    stages: Stages
    model: Any = None
    experts_modules: list = field(default_factory=list)
    trainable: list[str] = field(default_factory=list)
    parametrizations: dict[str, Any] = field(default_factory=dict)
    originals: dict[str, Any] = field(default_factory=dict)
    input_ids: Any = None
    baseline_loss: Any = None
    baseline_grads: dict[str, Any] = field(default_factory=dict)


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    from fsdpqdiag.probes.common import plain_integer_control

    cfg, knobs = split_config(config)
    evidence = _describe(cfg, knobs)
    quantize = _quantizer_or_skip(evidence, knobs["expert_bits"])
    if quantize is None:
        return evidence
    # The same fully_shard of plain frozen integer parameters, without bitsandbytes or
    # parametrize: what FSDP2 does to integer storage by itself.
    evidence["controls"] = {"plain_integer_parameters": plain_integer_control(cfg, ctx, evidence)}
    state = _MoeRun(ctx, cfg, knobs, evidence, Stages(ctx, evidence))
    if not (_stage_build(state) and _stage_lora(state)):
        return evidence
    # Weights and LoRA are drawn on the CPU (same numbers on every device); quantization
    # happens on the rank's device, as it does on load in training.
    state.model = state.model.to(ctx.device)
    state.stages.name_modules(state.model)
    if not (_stage_quantize(state, quantize) and _stage_baseline(state) and _stage_fully_shard(state)):
        return evidence
    loss = _stage_forward(state)
    _stage_backward(state, loss)
    # Runs even after a failed forward: the stored bytes are evidence either way.
    _stage_unshard(state)
    for view in STORAGE_VIEWS:
        evidence[f"expert_storage_{view}"] = aggregate(evidence["experts"], view)
    return evidence


def _describe(cfg: LinearConfig, knobs: dict[str, Any]) -> dict[str, Any]:
    from fsdpqdiag.stack.models import TINY_MOE

    bits = knobs["expert_bits"]
    return {
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


def _quantizer_or_skip(evidence: dict[str, Any], bits: int):
    """bitsandbytes' parametrize function for ``bits``, or None with ``evidence["skipped"]``
    saying what this stack lacks."""
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
        return None
    import transformers

    if not hasattr(transformers, "Qwen3MoeForCausalLM"):
        evidence["skipped"] = f"transformers {transformers.__version__} has no Qwen3MoeForCausalLM"
        return None
    return quantize


def _experts_modules(model) -> list:
    from fsdpqdiag.stack.models import decoder_layers

    return [layer.mlp.experts for layer in decoder_layers(model)]


def _stage_build(state: _MoeRun) -> bool:
    import torch
    import transformers

    from fsdpqdiag.stack.models import build_tiny_moe

    with state.stages.run("build model"):
        state.model = build_tiny_moe(state.cfg.weight_seed, state.cfg.compute_dtype)
    if not state.stages.ok("build model"):
        return False
    experts_modules = state.experts_modules = _experts_modules(state.model)
    fused = all(
        isinstance(getattr(experts, name, None), torch.nn.Parameter) and getattr(experts, name).dim() == 3
        for experts in experts_modules
        for name in EXPERT_PARAMS
    )
    if not fused:
        state.evidence["skipped"] = (
            f"transformers {transformers.__version__} does not store Qwen3-MoE experts as fused 3-D "
            f"parameters ({type(experts_modules[0]).__name__} has no 3-D {' / '.join(EXPERT_PARAMS)})"
        )
    return fused


def _stage_lora(state: _MoeRun) -> bool:
    import torch

    if not state.knobs["lora"]:
        state.stages.skip("LoRA", "disabled")
        return True
    with state.stages.run("LoRA"):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(state.cfg.weight_seed)
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
        state.model = get_peft_model(state.model, lora, autocast_adapter_dtype=False)
        state.trainable = [name for name, p in state.model.named_parameters() if p.requires_grad]
        state.evidence["lora"]["trainable_params"] = len(state.trainable)
    return state.stages.ok("LoRA")


def _stage_quantize(state: _MoeRun, quantize) -> bool:
    from fsdpqdiag.evidence.bytes import plain, sha256

    stages, cfg, bits = state.stages, state.cfg, state.knobs["expert_bits"]
    with stages.run("quantize experts"):
        for index, experts in enumerate(state.experts_modules):
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
                state.parametrizations[key] = holder
                state.originals[key] = storage.clone()
                state.evidence["experts"][key] = {
                    "fused_shape": fused_shape,
                    "storage_dtype": str(storage.dtype).removeprefix("torch."),
                    "storage_shape": list(storage.shape),
                    "parametrization": type(holder[0]).__name__,
                    "sha256": sha256(storage),
                }
    if not stages.ok("quantize experts"):
        return False
    stages.name_modules(state.model)
    return True


def _stage_baseline(state: _MoeRun) -> bool:
    """Forward and (with LoRA) backward without FSDP: the loss and gradients to compare with."""
    import torch

    from fsdpqdiag.stack.models import TINY_MOE, fixed_input

    stages, model, evidence = state.stages, state.model, state.evidence
    state.input_ids = fixed_input(
        TINY_MOE["vocab_size"], state.cfg.batch, state.knobs["seq_len"], state.cfg.input_seed
    ).to(state.ctx.device)
    with stages.run("baseline forward"):
        baseline_loss = model(input_ids=state.input_ids, labels=state.input_ids).loss
        evidence["baseline_loss"] = baseline_loss.item()
    if not stages.ok("baseline forward"):
        return False
    if state.trainable:
        with stages.run("baseline backward"):
            baseline_loss.backward()
            params = dict(model.named_parameters())
            grads = {
                n: params[n].grad.detach().clone() for n in state.trainable if params[n].grad is not None
            }
            state.baseline_grads = grads
            evidence["baseline_grads"] = {
                "trainable": len(state.trainable),
                "with_grad": len(grads),
                "nonfinite_elements": sum(int((~torch.isfinite(g)).sum()) for g in grads.values()),
                "abs_sum": sum(float(g.float().abs().sum()) for g in grads.values()),
            }
            model.zero_grad(set_to_none=True)
        if not stages.ok("baseline backward"):
            return False
    else:
        stages.skip("baseline backward", "no trainable parameters")
    state.baseline_loss = baseline_loss.detach()
    return True


def _stage_fully_shard(state: _MoeRun) -> bool:
    from fsdpqdiag.evidence.bytes import diff, plain
    from fsdpqdiag.probes.common import local_shard_of, shard
    from fsdpqdiag.stack.models import decoder_layers

    stages, ctx = state.stages, state.ctx
    with stages.run("fully_shard"):
        for layer in decoder_layers(state.model):
            stages.at(module=stages.module_names.get(id(layer), "?"))
            shard(layer, ctx, state.cfg)
        stages.at(module="(root)")
        shard(state.model, ctx, state.cfg)
    if not stages.ok("fully_shard"):
        return False
    for key, holder in state.parametrizations.items():
        state.evidence["experts"][key]["sharded_type"] = type(holder.original).__name__
        expected = local_shard_of(state.originals[key], ctx.rank, ctx.world_size)
        state.evidence["experts"][key]["local"] = compact(diff(expected, plain(holder.original)))
    return True


def _stage_forward(state: _MoeRun):
    """Forward under fully_shard, capturing what dequantize_4bit receives: FSDP2 has swapped
    the unsharded storage in by then, so this is the expert analogue of Linear4bit's swap
    target. The loss, or None where forward failed."""
    from fsdpqdiag.evidence.bytes import diff, output_delta, plain

    captured: dict[str, Any] = {}
    handles = []
    for key, holder in state.parametrizations.items():

        def capture(module, args, key=key):
            if key not in captured:
                captured[key] = plain(args[0]).clone()

        handles.append(holder[0].register_forward_pre_hook(capture))
    loss = None
    with state.stages.run("forward after fully_shard"):
        loss = state.model(input_ids=state.input_ids, labels=state.input_ids).loss
        state.evidence["loss"] = loss.item()
        state.evidence.update(output_delta(state.baseline_loss, loss.detach()))
    for handle in handles:
        handle.remove()
    for key, storage in captured.items():
        state.evidence["experts"][key]["forward"] = compact(diff(state.originals[key], storage))
    return loss if state.stages.ok("forward after fully_shard") else None


def _stage_backward(state: _MoeRun, loss) -> None:
    stages = state.stages
    if loss is not None and state.trainable:
        with stages.run("backward after fully_shard"):
            loss.backward()
        if stages.ok("backward after fully_shard"):
            state.evidence["lora_grads"] = grad_comparison(
                state.model, state.baseline_grads, state.ctx.rank, state.ctx.world_size
            )
    elif not state.trainable:
        stages.skip("backward after fully_shard", "no trainable parameters")


def _stage_unshard(state: _MoeRun) -> None:
    from fsdpqdiag.evidence.bytes import diff
    from fsdpqdiag.stack.models import decoder_layers

    stages = state.stages
    with stages.run("unshard"):
        for index, layer in enumerate(decoder_layers(state.model)):
            stages.at(module=stages.module_names.get(id(layer), "?"))
            layer.unshard()
            for key in (k for k in state.parametrizations if k.startswith(f"layers.{index}.")):
                state.evidence["experts"][key]["unsharded"] = compact(
                    diff(state.originals[key], state.parametrizations[key].original)
                )
            layer.reshard()
