"""int8-params (see its module): the model it walks through FSDP2, the baseline's helpers,
and how each stage's entry is compared and closed. torch, bitsandbytes and peft are
imported inside the functions, as in every probe module."""

from __future__ import annotations

from typing import Any

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

    from fsdpqdiag.core.config import torch_dtype

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


def not_run(reason: str) -> dict[str, Any]:
    return {"status": "not run", "reason": reason}


def byte_summary(original, observed) -> dict[str, Any]:
    from fsdpqdiag.evidence.bytes import diff

    found = diff(original, observed)
    return {key: found[key] for key in DIFF_KEYS if key in found}


def full_cpu(tensor):
    """A plain CPU tensor of a whole (possibly sharded DTensor) tensor; collective on DTensors."""
    from fsdpqdiag.evidence.bytes import plain

    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return plain(tensor).cpu()


def scb_of(weight):
    scb = getattr(weight, "SCB", None)
    return scb.detach().clone().cpu() if scb is not None else None


def equal_or_none(observed, original) -> bool | None:
    """Bit equality of two scale vectors; None where either is missing."""
    import torch

    if observed is None or original is None:
        return None
    return observed.dtype == original.dtype and bool(torch.equal(observed, original))


def same_bytes(left, right) -> bool:
    from fsdpqdiag.evidence.bytes import raw_bytes

    return (
        left.dtype == right.dtype
        and left.shape == right.shape
        and bool(raw_bytes(left).equal(raw_bytes(right)))
    )


def describe_weight(weight) -> dict[str, Any]:
    local = getattr(weight, "_local_tensor", None)
    return {
        "type": type(weight).__name__,
        "local_type": type(local).__name__ if local is not None else None,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "scb_present": getattr(weight, "SCB", None) is not None
        or (local is not None and getattr(local, "SCB", None) is not None),
    }


def close_stage(entry: dict[str, Any], findings: list[str]) -> dict[str, Any]:
    entry.setdefault("status", "completed")
    entry["findings"] = findings
    entry["ok"] = entry["status"] == "completed" and not findings
    return entry


def weight_findings(entry: dict[str, Any], what: str) -> list[str]:
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


def compare_output(reference, observed, what: str) -> tuple[dict[str, Any], list[str]]:
    from fsdpqdiag.evidence.bytes import output_delta

    delta = output_delta(reference, observed)
    if delta["output_bit_equal"]:
        return delta, []
    return delta, [f"{what} differs from the baseline (max |Δy| {delta['max_abs_delta']})"]
