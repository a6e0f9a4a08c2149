"""int8-params' run (see its module), one function per stage: the baseline, then the model
under test through fully_shard, unshard, forward, backward, state_dict, save and load.
Each stage writes its entry to ``evidence["stages"]``; one that raised is a RaisedStage."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fsdpqdiag.probes.int8_params.setup import (
    LORA,
    STAGES,
    as_policy_dtype,
    base_layer,
    build_int8_lora,
    byte_summary,
    close_stage,
    compare_output,
    describe_weight,
    equal_or_none,
    fixed_input,
    full_cpu,
    loss_of,
    not_run,
    same_bytes,
    scb_of,
    weight_findings,
)
from fsdpqdiag.probes.raised import RaisedStage


@dataclass
class _Run:
    """What every stage of one run reads: the config, the input, the baseline's numbers
    (never sharded) and the model under test; ``stages`` is where each stage's entry goes."""

    cfg: Any
    ctx: Any
    x: Any
    param_dtype: Any
    evidence: dict[str, Any]
    original: Any = None
    original_scb: Any = None
    baseline_keys: list[str] = field(default_factory=list)
    baseline_output: Any = None
    baseline_grads: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    layer: Any = None

    @property
    def stages(self) -> dict[str, Any]:
        return self.evidence["stages"]

    def enter(self, stage: str) -> None:
        self.ctx.checkpoint(stage, self.evidence)


# Where peft puts the 8-bit layer's own state dict entries.
PREFIX = "base_model.model.proj.base_layer."


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    import peft

    from fsdpqdiag.core.config import LinearConfig, torch_dtype
    from fsdpqdiag.probes.common import plain_integer_control

    cfg = LinearConfig(**config)
    evidence: dict[str, Any] = {
        "shape": [cfg.out_features, cfg.in_features],
        "lora": f"peft {peft.__version__} LoraConfig(r={LORA['r']}, lora_alpha={LORA['lora_alpha']})",
        "param_dtype": cfg.param_dtype,
        "stages": {},
    }
    state = _Run(cfg, ctx, fixed_input(cfg, ctx.device), torch_dtype(cfg.param_dtype), evidence)
    _baseline(state)
    _model_under_test(state)
    # The same fully_shard of plain frozen int8/uint8 parameters: what FSDP2 does without
    # Int8Params, which decides whom a failure below belongs to.
    evidence["controls"] = {"plain_integer_parameters": plain_integer_control(cfg, ctx, evidence)}
    if not _stage_fully_shard(state):
        return evidence
    _stage_unshard(state)
    output = _stage_forward(state)
    _stage_backward(state, output)
    saved = _stage_save(state, _stage_state_dict(state))
    _stage_load(state, saved)
    return evidence


def _baseline(state: _Run) -> None:
    """The baseline: never sharded. Its original weight and SCB are taken before its first
    forward, which moves SCB from the weight into the layer's MatmulLtState."""
    import torch

    from fsdpqdiag.evidence.bytes import sha256

    baseline = build_int8_lora(state.cfg, state.ctx.device, state.cfg.weight_seed)
    original = base_layer(baseline).weight.detach().clone().cpu().as_subclass(torch.Tensor)
    original_scb = scb_of(base_layer(baseline).weight)
    baseline_keys = sorted(baseline.state_dict())
    as_policy_dtype(baseline, state.param_dtype)
    baseline_output = baseline(state.x)
    loss_of(baseline_output).backward()
    state.baseline_grads = {
        name: p.grad.detach().float().cpu() for name, p in baseline.named_parameters() if p.requires_grad
    }
    state.baseline_output = baseline_output.detach().clone()
    state.original, state.original_scb, state.baseline_keys = original, original_scb, baseline_keys
    state.evidence["original"] = {
        "dtype": str(original.dtype).removeprefix("torch."),
        "sha256": sha256(original),
        "scb_elements": None if original_scb is None else original_scb.numel(),
        "scb_sha256": None if original_scb is None else sha256(original_scb),
        "state_dict_keys": baseline_keys,
    }


def _model_under_test(state: _Run) -> None:
    import torch

    state.model = build_int8_lora(state.cfg, state.ctx.device, state.cfg.weight_seed)
    state.layer = base_layer(state.model)
    state.evidence["identical_build"] = bool(
        torch.equal(state.layer.weight.detach().cpu().as_subclass(torch.Tensor), state.original)
    ) and (equal_or_none(scb_of(state.layer.weight), state.original_scb) is True)


def _stage_fully_shard(state: _Run) -> bool:
    """fully_shard: accepted? what the sharded weight is, its local int8 bytes, its SCB.
    False (every later stage marked not run) where it raised."""
    from fsdpqdiag.probes.common import local_shard_of, shard

    state.enter("fully_shard")
    layer, stages = state.layer, state.stages
    try:
        shard(state.model, state.ctx, state.cfg)
    except Exception as exc:  # noqa: BLE001 - the stack's refusal is the finding
        stages["fully_shard"] = close_stage(RaisedStage.of(exc, "fully_shard").to_dict(), [])
        for name in STAGES[1:]:
            stages[name] = close_stage(not_run("fully_shard raised"), [])
        return False
    entry = describe_weight(layer.weight)
    local = getattr(layer.weight, "_local_tensor", layer.weight)
    entry["local_shape"] = list(local.shape)
    entry["bytes"] = byte_summary(
        local_shard_of(state.original, state.ctx.rank, state.ctx.world_size), local.detach().cpu()
    )
    stages["fully_shard"] = close_stage(entry, weight_findings(entry, "the sharded weight"))
    return True


def _stage_unshard(state: _Run) -> None:
    """unshard: the all-gathered weight, as FSDP2 installs it on the module for forward."""
    state.enter("unshard")
    try:
        state.model.unshard()
        gathered = state.layer.weight
        entry = describe_weight(gathered)
        entry["bytes"] = byte_summary(state.original, full_cpu(gathered))
        state.model.reshard()
    except Exception as exc:  # noqa: BLE001
        state.stages["unshard"] = close_stage(RaisedStage.of(exc, "unshard").to_dict(), [])
    else:
        state.stages["unshard"] = close_stage(entry, weight_findings(entry, "the unsharded weight"))


def _stage_forward(state: _Run):
    """forward: the weight Linear8bitLt.forward receives (captured by a pre-hook that runs
    after FSDP2's own), then the output against the baseline. The output, or None."""
    state.enter("forward")
    model = state.model
    seen: dict[str, Any] = {}

    def capture(module, args):
        weight = module.weight
        seen.update(describe_weight(weight))
        seen["cb_present"] = getattr(weight, "CB", None) is not None

    handle = state.layer.register_forward_pre_hook(capture)
    output = None
    try:
        output = model(state.x)
    except Exception as exc:  # noqa: BLE001
        entry = RaisedStage.of(exc, "forward").to_dict()
        # A forward that raised leaves FSDP2 mid-step; bring the module back to sharded so
        # that the later stages see what a job that caught the error would hold.
        try:
            model.reshard()
        except Exception as reshard_exc:  # noqa: BLE001
            entry["reshard_after_error"] = RaisedStage.of(reshard_exc).exception
    else:
        entry = {}
    handle.remove()
    findings = []
    if seen:
        entry["weight_seen"] = seen
        if not seen["scb_present"]:
            findings.append(f"SCB absent on the weight forward receives (a plain {seen['type']})")
    if output is not None:
        delta, output_findings = compare_output(state.baseline_output, output, "the output")
        entry.update(delta)
        findings += output_findings
    state.stages["forward"] = close_stage(entry, findings)
    return output


def _stage_backward(state: _Run, output) -> None:
    """backward: every LoRA gradient exists and equals the baseline's."""
    import torch

    state.enter("backward")
    if output is None:
        state.stages["backward"] = close_stage(not_run("forward raised"), [])
        return
    try:
        loss_of(output).backward()
        grads = {
            name: None if p.grad is None else full_cpu(p.grad).float()
            for name, p in state.model.named_parameters()
            if p.requires_grad
        }
    except Exception as exc:  # noqa: BLE001
        state.stages["backward"] = close_stage(RaisedStage.of(exc, "backward").to_dict(), [])
        return
    entry, findings = {"grads": {}}, []
    for name, reference in state.baseline_grads.items():
        grad = grads.get(name)
        if grad is None:
            entry["grads"][name] = {"present": False}
            findings.append(f"no gradient for {name}")
            continue
        equal = grad.shape == reference.shape and bool(torch.equal(grad, reference))
        delta = float((grad - reference).abs().max()) if grad.shape == reference.shape else None
        entry["grads"][name] = {"present": True, "bit_equal": equal, "max_abs_delta": delta}
        if not equal:
            findings.append(f"gradient of {name} differs from the baseline (max |Δ| {delta})")
    state.stages["backward"] = close_stage(entry, findings)


def _stage_state_dict(state: _Run):
    """state_dict: what a sharded model hands to a checkpointing library, and whether its
    int8 weight and SCB gather back to the original. The state dict, or None."""
    state.enter("state_dict")
    try:
        state_dict = state.model.state_dict()
    except Exception as exc:  # noqa: BLE001
        state.stages["state_dict"] = close_stage(RaisedStage.of(exc, "state_dict").to_dict(), [])
        return None
    baseline_keys = state.baseline_keys
    entry = {
        "keys": sorted(state_dict),
        "types": {key: type(value).__name__ for key, value in sorted(state_dict.items())},
        "missing_keys": sorted(set(baseline_keys) - set(state_dict)),
        "extra_keys": sorted(set(state_dict) - set(baseline_keys)),
        "weight_is_dtensor": type(state_dict.get(PREFIX + "weight")).__name__ == "DTensor",
        "scb_present": PREFIX + "SCB" in state_dict,
        "weight_format_present": PREFIX + "weight_format" in state_dict,
    }
    findings = []
    if entry["missing_keys"]:
        missing = ", ".join(key.removeprefix(PREFIX) for key in entry["missing_keys"])
        findings.append(f"keys missing: {missing}")
    if entry["extra_keys"]:
        findings.append(f"unexpected keys: {', '.join(entry['extra_keys'])}")
    try:
        weight = state_dict.get(PREFIX + "weight")
        entry["weight_bytes"] = byte_summary(state.original, full_cpu(weight)) if weight is not None else None
        scb = state_dict.get(PREFIX + "SCB")
        entry["scb_equal"] = equal_or_none(full_cpu(scb) if scb is not None else None, state.original_scb)
    except Exception as exc:  # noqa: BLE001
        entry["gather_error"] = RaisedStage.of(exc, "state_dict").to_dict()
        findings.append(f"gathering the state dict raised {entry['gather_error']['exception']}")
    else:
        if entry["weight_bytes"] is not None and not entry["weight_bytes"].get("bytes_equal"):
            findings.append("int8 weight gathered from the state dict differs from the original")
        if entry["scb_equal"] is False:
            findings.append("SCB in the state dict differs from the original")
    state.stages["state_dict"] = close_stage(entry, findings)
    return state_dict


def _stage_save(state: _Run, state_dict):
    """save: every entry gathered to a full tensor (a collective per DTensor) and
    torch.save'd, as save_pretrained does; then read back from the file. What was read
    back, or None."""
    import tempfile
    from pathlib import Path

    import torch

    state.enter("save")
    if state_dict is None:
        state.stages["save"] = close_stage(not_run("state_dict raised"), [])
        return None
    try:
        full_state = {key: full_cpu(value) for key, value in state_dict.items()}
        with tempfile.TemporaryDirectory(prefix="fsdpqdiag-int8-") as directory:
            path = Path(directory) / "pytorch_model.bin"
            torch.save(full_state, path)
            file_bytes = path.stat().st_size
            saved = torch.load(path, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        state.stages["save"] = close_stage(RaisedStage.of(exc, "save").to_dict(), [])
        return None
    entry = {
        "file_bytes": file_bytes,
        "tensors": len(saved),
        "round_trip_equal": sorted(saved) == sorted(full_state)
        and all(same_bytes(saved[key], full_state[key]) for key in full_state),
        "scb_saved": PREFIX + "SCB" in saved,
    }
    findings = []
    if not entry["round_trip_equal"]:
        findings.append("the file read back differs from the gathered state dict")
    if not entry["scb_saved"]:
        findings.append("the checkpoint holds no SCB")
    state.stages["save"] = close_stage(entry, findings)
    return saved


def _stage_load(state: _Run, saved) -> None:
    """load: a fresh, never-sharded model quantized from other seeds (so its own SCB and
    bytes differ); after load_state_dict its forward must equal the baseline's."""
    import torch

    state.enter("load")
    if saved is None:
        state.stages["load"] = close_stage(not_run("nothing was saved"), [])
        return
    fresh = build_int8_lora(state.cfg, state.ctx.device, state.cfg.weight_seed + 1)
    fresh_layer = base_layer(fresh)
    entry = {
        "fresh_differs_before_load": not bool(
            torch.equal(fresh_layer.weight.detach().cpu().as_subclass(torch.Tensor), state.original)
        )
    }
    try:
        result = fresh.load_state_dict(saved, strict=False)
        as_policy_dtype(fresh, state.param_dtype)
        loaded_weight = fresh_layer.weight.detach().cpu().as_subclass(torch.Tensor)
        loaded_scb = scb_of(fresh_layer.weight)
        reloaded_output = fresh(state.x).detach()
    except Exception as exc:  # noqa: BLE001
        state.stages["load"] = close_stage({**entry, **RaisedStage.of(exc, "load").to_dict()}, [])
        return
    entry["missing_keys"] = sorted(result.missing_keys)
    entry["unexpected_keys"] = sorted(result.unexpected_keys)
    entry["weight_bytes"] = byte_summary(state.original, loaded_weight)
    entry["scb_equal"] = equal_or_none(loaded_scb, state.original_scb)
    findings = []
    if entry["missing_keys"] or entry["unexpected_keys"]:
        findings.append(
            f"load_state_dict: missing {entry['missing_keys']}, unexpected {entry['unexpected_keys']}"
        )
    if not entry["weight_bytes"].get("bytes_equal"):
        findings.append("loaded int8 weight differs from the original")
    if not entry["scb_equal"]:
        cause = (
            " (none was saved: the fresh layer keeps its own scales)" if PREFIX + "SCB" not in saved else ""
        )
        findings.append(f"loaded SCB differs from the original{cause}")
    delta, output_findings = compare_output(
        state.baseline_output, reloaded_output, "the reloaded model's output"
    )
    entry.update(delta)
    findings += output_findings
    state.stages["load"] = close_stage(entry, findings)
