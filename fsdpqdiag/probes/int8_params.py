"""issue 6, probe 3: ``Linear8bitLt(has_fp16_weights=False)`` + LoRA through FSDP2, end to end.

An 8-bit layer keeps its weight as ``Int8Params``: int8 row-quantized values plus a
Python attribute ``SCB`` (one fp32 scale per output row) that ``forward`` and
``_save_to_state_dict`` read from the weight. FSDP2 builds its own parameters from the
data (torch 2.13: ``nn.Parameter(DTensor)`` sharded, ``nn.Parameter(Tensor)`` unsharded);
whether the subclass and its ``SCB`` survive that is what axolotl's ``fsdp2_qlora``
patches are about. The probe walks one real peft LoRA model (``get_peft_model`` on a tiny wrapper of
one ``Linear8bitLt``) through every stage a training job does, and records per stage what
happened, with the exact exception and the frame it came from where a stage fails:

``fully_shard`` (accepted? local shard's int8 bytes; SCB on the sharded weight),
``unshard`` (the all-gathered weight's dtype, bytes, SCB), ``forward`` (the weight forward
receives; output vs a non-FSDP baseline), ``backward`` (LoRA gradients vs the baseline's),
``state_dict`` (keys, DTensor weights, SCB / weight_format, int8 bytes gathered back),
``save`` (the state dict gathered to full tensors and ``torch.save``d, as
``save_pretrained`` would) and ``load`` (into a fresh non-FSDP model quantized from other
seeds, whose forward must then equal the baseline's).

The baseline is the same model built again from the same seeds, never sharded, with its
LoRA weights rounded to the policy's ``param_dtype``: FSDP2 computes in that dtype, so a
byte-true stack gives bit-equal outputs and gradients.
"""

from __future__ import annotations

from typing import Any

from fsdpqdiag.outcome import RankOutcome
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict, ranks_agree
from fsdpqdiag.report import NOT_REPRODUCED, REPRODUCED

STAGES = ("fully_shard", "unshard", "forward", "backward", "state_dict", "save", "load")
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["proj"], "init_lora_weights": False}
# Only these keys of bytes.diff: the positions and samples of an int8 diff add nothing here.
DIFF_KEYS = ("comparable", "reason", "bytes_equal", "differing_elements", "differing_bytes")


def _model_class():
    import torch

    class Int8LoRAModel(torch.nn.Module):
        """One ``Linear8bitLt`` named ``proj``, as peft finds it in a real model."""

        def __init__(self, proj):
            super().__init__()
            self.proj = proj

        def forward(self, x):
            return self.proj(x)

    return Int8LoRAModel


def build_int8_lora(cfg, device, weight_seed: int):
    """A peft LoRA model over a ``Linear8bitLt(has_fp16_weights=False)`` quantized on ``device``.

    The fp32 weight is drawn on the CPU from ``weight_seed``; ``.to(device)`` quantizes it
    (bitsandbytes does that for any non-meta device, the CPU included). LoRA B starts
    non-zero (``init_lora_weights=False``) so that the adapter moves the output and both
    A and B receive gradients.
    """
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(weight_seed)
    proj = bnb.nn.Linear8bitLt(cfg.in_features, cfg.out_features, bias=cfg.bias, has_fp16_weights=False)
    model = _model_class()(proj).to(device)
    return get_peft_model(model, LoraConfig(**LORA))


def fixed_input(cfg, device):
    import torch

    from fsdpqdiag.config import torch_dtype

    generator = torch.Generator().manual_seed(cfg.input_seed)
    x = torch.randn(cfg.batch, cfg.in_features, generator=generator)
    return x.to(dtype=torch_dtype(cfg.compute_dtype), device=device)


def as_policy_dtype(model, param_dtype) -> None:
    """Round the trainable (LoRA) weights to ``param_dtype``, as FSDP2 does for compute."""
    import torch

    if param_dtype is None:
        return
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(param_dtype)


def base_layer(model):
    return model.base_model.model.proj.base_layer


def loss_of(output):
    return output.float().pow(2).mean()


def _not_run(reason: str) -> dict[str, Any]:
    return {"status": "not run", "reason": reason}


def _bytes(original, observed) -> dict[str, Any]:
    from fsdpqdiag.bytes import diff

    found = diff(original, observed)
    return {key: found[key] for key in DIFF_KEYS if key in found}


def _full(tensor):
    """A plain CPU tensor of a whole (possibly sharded DTensor) tensor; collective on DTensors."""
    from fsdpqdiag.bytes import plain

    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return plain(tensor).cpu()


def _scb(weight):
    scb = getattr(weight, "SCB", None)
    return scb.detach().clone().cpu() if scb is not None else None


def _equal_or_none(observed, original) -> bool | None:
    """Bit equality of two scale vectors; None where either is missing."""
    import torch

    if observed is None or original is None:
        return None
    return observed.dtype == original.dtype and bool(torch.equal(observed, original))


def _same_bytes(left, right) -> bool:
    from fsdpqdiag.bytes import raw_bytes

    return (
        left.dtype == right.dtype
        and left.shape == right.shape
        and bool(raw_bytes(left).equal(raw_bytes(right)))
    )


def _describe_weight(weight) -> dict[str, Any]:
    local = getattr(weight, "_local_tensor", None)
    return {
        "type": type(weight).__name__,
        "local_type": type(local).__name__ if local is not None else None,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "scb_present": getattr(weight, "SCB", None) is not None
        or (local is not None and getattr(local, "SCB", None) is not None),
    }


def _close(entry: dict[str, Any], findings: list[str]) -> dict[str, Any]:
    entry.setdefault("status", "completed")
    entry["findings"] = findings
    entry["ok"] = entry["status"] == "completed" and not findings
    return entry


def _weight_findings(entry: dict[str, Any], what: str) -> list[str]:
    findings = []
    if entry["dtype"] != "int8":
        findings.append(f"{what} is {entry['dtype']}, not int8")
    elif not entry["bytes"].get("bytes_equal"):
        findings.append(f"{entry['bytes'].get('differing_elements')} int8 elements of {what} differ")
    if not entry["scb_present"]:
        form = (
            f"{entry['type']} over {entry['local_type']}"
            if entry["local_type"]
            else f"a plain {entry['type']}"
        )
        findings.append(f"SCB absent on {what} ({form})")
    return findings


def _compare_output(reference, observed, what: str) -> tuple[dict[str, Any], list[str]]:
    from fsdpqdiag.bytes import output_delta

    delta = output_delta(reference, observed)
    if delta["output_bit_equal"]:
        return delta, []
    return delta, [f"{what} differs from the baseline (max |Δy| {delta['max_abs_delta']})"]


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    import tempfile
    from pathlib import Path

    import peft
    import torch

    from fsdpqdiag.bytes import sha256
    from fsdpqdiag.config import LinearConfig, torch_dtype
    from fsdpqdiag.probes.common import local_shard_of, plain_integer_control, raised, shard

    cfg = LinearConfig(**config)
    param_dtype = torch_dtype(cfg.param_dtype)
    x = fixed_input(cfg, ctx.device)
    evidence: dict[str, Any] = {
        "shape": [cfg.out_features, cfg.in_features],
        "lora": f"peft {peft.__version__} LoraConfig(r={LORA['r']}, lora_alpha={LORA['lora_alpha']})",
        "param_dtype": cfg.param_dtype,
        "stages": {},
    }
    stages = evidence["stages"]

    # The baseline: never sharded. Its original weight and SCB are taken before its first
    # forward, which moves SCB from the weight into the layer's MatmulLtState.
    baseline = build_int8_lora(cfg, ctx.device, cfg.weight_seed)
    original = base_layer(baseline).weight.detach().clone().cpu().as_subclass(torch.Tensor)
    original_scb = _scb(base_layer(baseline).weight)
    baseline_keys = sorted(baseline.state_dict())
    as_policy_dtype(baseline, param_dtype)
    baseline_output = baseline(x)
    loss_of(baseline_output).backward()
    baseline_grads = {
        name: p.grad.detach().float().cpu() for name, p in baseline.named_parameters() if p.requires_grad
    }
    baseline_output = baseline_output.detach().clone()
    evidence["original"] = {
        "dtype": str(original.dtype).removeprefix("torch."),
        "sha256": sha256(original),
        "scb_elements": None if original_scb is None else original_scb.numel(),
        "scb_sha256": None if original_scb is None else sha256(original_scb),
        "state_dict_keys": baseline_keys,
    }

    model = build_int8_lora(cfg, ctx.device, cfg.weight_seed)
    layer = base_layer(model)
    evidence["identical_build"] = bool(
        torch.equal(layer.weight.detach().cpu().as_subclass(torch.Tensor), original)
    ) and (_equal_or_none(_scb(layer.weight), original_scb) is True)

    # The same fully_shard of plain frozen int8/uint8 parameters: what FSDP2 does without
    # Int8Params, which decides whom a failure below belongs to.
    evidence["controls"] = {"plain_integer_parameters": plain_integer_control(cfg, ctx, evidence)}

    # fully_shard: accepted? what the sharded weight is, its local int8 bytes, its SCB.
    ctx.checkpoint("fully_shard", evidence)
    try:
        shard(model, ctx, cfg)
    except Exception as exc:  # noqa: BLE001 - the stack's refusal is the finding
        stages["fully_shard"] = _close(raised(exc), [])
        for name in STAGES[1:]:
            stages[name] = _close(_not_run("fully_shard raised"), [])
        return evidence
    entry = _describe_weight(layer.weight)
    local = getattr(layer.weight, "_local_tensor", layer.weight)
    entry["local_shape"] = list(local.shape)
    entry["bytes"] = _bytes(local_shard_of(original, ctx.rank, ctx.world_size), local.detach().cpu())
    stages["fully_shard"] = _close(entry, _weight_findings(entry, "the sharded weight"))

    # unshard: the all-gathered weight, as FSDP2 installs it on the module for forward.
    ctx.checkpoint("unshard", evidence)
    try:
        model.unshard()
        gathered = layer.weight
        entry = _describe_weight(gathered)
        entry["bytes"] = _bytes(original, _full(gathered))
        model.reshard()
    except Exception as exc:  # noqa: BLE001
        stages["unshard"] = _close(raised(exc), [])
    else:
        stages["unshard"] = _close(entry, _weight_findings(entry, "the unsharded weight"))

    # forward: the weight Linear8bitLt.forward receives (captured by a pre-hook that runs
    # after FSDP2's own), then the output against the baseline.
    ctx.checkpoint("forward", evidence)
    seen: dict[str, Any] = {}

    def capture(module, args):
        weight = module.weight
        seen.update(_describe_weight(weight))
        seen["cb_present"] = getattr(weight, "CB", None) is not None

    handle = layer.register_forward_pre_hook(capture)
    output = None
    try:
        output = model(x)
    except Exception as exc:  # noqa: BLE001
        entry = raised(exc)
        # A forward that raised leaves FSDP2 mid-step; bring the module back to sharded so
        # that the later stages see what a job that caught the error would hold.
        try:
            model.reshard()
        except Exception as reshard_exc:  # noqa: BLE001
            entry["reshard_after_error"] = raised(reshard_exc)["error"]
    else:
        entry = {}
    handle.remove()
    findings = []
    if seen:
        entry["weight_seen"] = seen
        if not seen["scb_present"]:
            findings.append(f"SCB absent on the weight forward receives (a plain {seen['type']})")
    if output is not None:
        delta, output_findings = _compare_output(baseline_output, output, "the output")
        entry.update(delta)
        findings += output_findings
    stages["forward"] = _close(entry, findings)

    # backward: every LoRA gradient exists and equals the baseline's.
    ctx.checkpoint("backward", evidence)
    if output is None:
        stages["backward"] = _close(_not_run("forward raised"), [])
    else:
        try:
            loss_of(output).backward()
            grads = {
                name: None if p.grad is None else _full(p.grad).float()
                for name, p in model.named_parameters()
                if p.requires_grad
            }
        except Exception as exc:  # noqa: BLE001
            stages["backward"] = _close(raised(exc), [])
        else:
            entry, findings = {"grads": {}}, []
            for name, reference in baseline_grads.items():
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
            stages["backward"] = _close(entry, findings)

    # state_dict: what a sharded model hands to a checkpointing library, and whether its
    # int8 weight and SCB gather back to the original.
    ctx.checkpoint("state_dict", evidence)
    prefix = "base_model.model.proj.base_layer."
    state = None
    try:
        state = model.state_dict()
    except Exception as exc:  # noqa: BLE001
        stages["state_dict"] = _close(raised(exc), [])
    else:
        entry = {
            "keys": sorted(state),
            "types": {key: type(value).__name__ for key, value in sorted(state.items())},
            "missing_keys": sorted(set(baseline_keys) - set(state)),
            "extra_keys": sorted(set(state) - set(baseline_keys)),
            "weight_is_dtensor": type(state.get(prefix + "weight")).__name__ == "DTensor",
            "scb_present": prefix + "SCB" in state,
            "weight_format_present": prefix + "weight_format" in state,
        }
        findings = []
        if entry["missing_keys"]:
            missing = ", ".join(key.removeprefix(prefix) for key in entry["missing_keys"])
            findings.append(f"keys missing: {missing}")
        if entry["extra_keys"]:
            findings.append(f"unexpected keys: {', '.join(entry['extra_keys'])}")
        try:
            weight = state.get(prefix + "weight")
            entry["weight_bytes"] = _bytes(original, _full(weight)) if weight is not None else None
            scb = state.get(prefix + "SCB")
            entry["scb_equal"] = _equal_or_none(_full(scb) if scb is not None else None, original_scb)
        except Exception as exc:  # noqa: BLE001
            entry["gather_error"] = raised(exc)
            findings.append(f"gathering the state dict raised {entry['gather_error']['error']}")
        else:
            if entry["weight_bytes"] is not None and not entry["weight_bytes"].get("bytes_equal"):
                findings.append("int8 weight gathered from the state dict differs from the original")
            if entry["scb_equal"] is False:
                findings.append("SCB in the state dict differs from the original")
        stages["state_dict"] = _close(entry, findings)

    # save: every entry gathered to a full tensor (a collective per DTensor) and torch.save'd,
    # as save_pretrained does; then read back from the file.
    ctx.checkpoint("save", evidence)
    saved = None
    if state is None:
        stages["save"] = _close(_not_run("state_dict raised"), [])
    else:
        try:
            full_state = {key: _full(value) for key, value in state.items()}
            with tempfile.TemporaryDirectory(prefix="fsdpqdiag-int8-") as directory:
                path = Path(directory) / "pytorch_model.bin"
                torch.save(full_state, path)
                file_bytes = path.stat().st_size
                saved = torch.load(path, weights_only=True)
        except Exception as exc:  # noqa: BLE001
            stages["save"] = _close(raised(exc), [])
        else:
            entry = {
                "file_bytes": file_bytes,
                "tensors": len(saved),
                "round_trip_equal": sorted(saved) == sorted(full_state)
                and all(_same_bytes(saved[key], full_state[key]) for key in full_state),
                "scb_saved": prefix + "SCB" in saved,
            }
            findings = []
            if not entry["round_trip_equal"]:
                findings.append("the file read back differs from the gathered state dict")
            if not entry["scb_saved"]:
                findings.append("the checkpoint holds no SCB")
            stages["save"] = _close(entry, findings)

    # load: a fresh, never-sharded model quantized from other seeds (so its own SCB and
    # bytes differ); after load_state_dict its forward must equal the baseline's.
    ctx.checkpoint("load", evidence)
    if saved is None:
        stages["load"] = _close(_not_run("nothing was saved"), [])
        return evidence
    fresh = build_int8_lora(cfg, ctx.device, cfg.weight_seed + 1)
    fresh_layer = base_layer(fresh)
    entry = {
        "fresh_differs_before_load": not bool(
            torch.equal(fresh_layer.weight.detach().cpu().as_subclass(torch.Tensor), original)
        )
    }
    try:
        result = fresh.load_state_dict(saved, strict=False)
        as_policy_dtype(fresh, param_dtype)
        loaded_weight = fresh_layer.weight.detach().cpu().as_subclass(torch.Tensor)
        loaded_scb = _scb(fresh_layer.weight)
        reloaded_output = fresh(x).detach()
    except Exception as exc:  # noqa: BLE001
        stages["load"] = _close({**entry, **raised(exc)}, [])
        return evidence
    entry["missing_keys"] = sorted(result.missing_keys)
    entry["unexpected_keys"] = sorted(result.unexpected_keys)
    entry["weight_bytes"] = _bytes(original, loaded_weight)
    entry["scb_equal"] = _equal_or_none(loaded_scb, original_scb)
    findings = []
    if entry["missing_keys"] or entry["unexpected_keys"]:
        findings.append(
            f"load_state_dict: missing {entry['missing_keys']}, unexpected {entry['unexpected_keys']}"
        )
    if not entry["weight_bytes"].get("bytes_equal"):
        findings.append("loaded int8 weight differs from the original")
    if not entry["scb_equal"]:
        cause = (
            " (none was saved: the fresh layer keeps its own scales)" if prefix + "SCB" not in saved else ""
        )
        findings.append(f"loaded SCB differs from the original{cause}")
    delta, output_findings = _compare_output(baseline_output, reloaded_output, "the reloaded model's output")
    entry.update(delta)
    findings += output_findings
    stages["load"] = _close(entry, findings)
    return evidence


def _stage_key(evidence: dict) -> tuple:
    stages = evidence.get("stages", {})
    return tuple(
        (
            name,
            stages.get(name, {}).get("status"),
            stages.get(name, {}).get("ok"),
            stages.get(name, {}).get("error"),
        )
        for name in STAGES
    )


def _describe_failure(entry: dict, brief: bool = False) -> str:
    if entry.get("status") == "raised":
        where = f" at {entry['where']}" if entry.get("where") else ""
        return f"{entry['error']}{where}"
    if entry.get("status") == "not run":
        return f"not run ({entry.get('reason')})"
    findings = entry.get("findings", [])
    return (findings[0] if brief else "; ".join(findings)) if findings else "altered"


def verdict(outcomes: list[RankOutcome]) -> Verdict:
    failed = failure_verdict(outcomes, keep_evidence=True)
    if failed is not None:
        return failed
    evidence = dict(outcomes[0].evidence)
    evidence["ranks_agree"] = ranks_agree(outcomes, _stage_key)
    failing: dict[str, tuple[int, dict]] = {}
    for name in STAGES:
        for outcome in outcomes:
            entry = outcome.evidence.get("stages", {}).get(name)
            if entry is not None and not entry.get("ok"):
                failing[name] = (outcome.rank, entry)
                break
    evidence["failing_stages"] = list(failing)
    evidence["first_failing_stage"] = next(iter(failing), None)
    if not failing:
        return Verdict(
            NOT_REPRODUCED,
            "every stage (fully_shard, unshard, forward, backward, state_dict, save, load) kept the int8 "
            "bytes and SCB; outputs and LoRA gradients bit-equal to the non-FSDP baseline",
            evidence,
        )
    # The first failing stage in full; each later one by its error or first finding.
    (first, (rank, entry)), *later = failing.items()
    summary = f"first failing stage {first} (rank {rank}): {_describe_failure(entry)}"
    if later:
        summary += "; then " + "; ".join(
            f"{name}: {_describe_failure(entry, brief=True)}" for name, (_, entry) in later
        )
    return Verdict(REPRODUCED, summary, evidence)


def attribute(evidence: dict) -> tuple[str, list[str]]:
    from fsdpqdiag import attribution

    control = (evidence.get("controls") or {}).get("plain_integer_parameters")
    first = evidence.get("first_failing_stage")
    if control is None or first is None:
        return attribution.UNDETERMINED, [f"the run ended in {evidence.get('stage') or 'setup'}"]
    said = f"control: plain frozen int8/uint8 parameters through the same fully_shard: {control['outcome']}"
    if control["outcome"] != "kept":
        # FSDP2 fails plain integer parameters the same way: not Int8Params' doing.
        return attribution.TORCH_FSDP, [said, f"first failing stage: {first}"]
    return attribution.BITSANDBYTES, [
        said,
        f"first failing stage: {first}: Int8Params keeps SCB/CB on the Parameter object, which "
        "FSDP2 replaces, and defines no fsdp_pre_all_gather to carry them",
    ]


PROBE = Probe(
    name="int8-params",
    description="Linear8bitLt + LoRA under fully_shard: int8 bytes and SCB through shard, forward, "
    "backward, state_dict, save and load?",
    run=run,
    verdict=verdict,
    needs=Needs(packages=("bitsandbytes", "peft")),
    standalone="reproducers/int8_params.py",
    attribute=attribute,
    # Its backward reduce-scatters the LoRA gradients.
    preconditions=("all_gather_into_tensor", "reduce_scatter_tensor"),
)
