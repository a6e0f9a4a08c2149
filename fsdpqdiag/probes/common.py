"""Building blocks shared by probes: the synthetic layer, the FSDP2 call, the capture.

Each is one small function so that a probe (and later a matrix cell) reads as a
composition of them, torchtitan-style. The FSDP2 call lives in ``shard``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from fsdpqdiag.core.config import INTEGER_PARAMS, LinearConfig, torch_dtype
from fsdpqdiag.evidence.bytes import plain
from fsdpqdiag.probes.raised import RaisedStage
from fsdpqdiag.stack import bnb_cpu_path


def fsdp_api():
    """``fully_shard`` and ``MixedPrecisionPolicy`` wherever this torch keeps them."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def build_linear4bit(cfg: LinearConfig, device: torch.device):
    """A quantized ``bnb.nn.Linear4bit`` and a fixed-seed input for it.

    Weights and input are drawn on the CPU so that the same seeds give the same numbers
    on every device; quantization happens on ``device`` as it would in training.
    """
    import bitsandbytes as bnb

    torch.manual_seed(cfg.weight_seed)
    linear = bnb.nn.Linear4bit(
        cfg.in_features,
        cfg.out_features,
        bias=cfg.bias,
        compute_dtype=torch_dtype(cfg.compute_dtype),
        compress_statistics=cfg.double_quant,
        quant_type=cfg.quant_type,
        quant_storage=torch_dtype(cfg.quant_storage),
    )
    bnb_cpu_path.apply(linear)
    linear = linear.to(device)
    generator = torch.Generator().manual_seed(cfg.input_seed)
    x = torch.randn(cfg.batch, cfg.in_features, generator=generator)
    return linear, x.to(dtype=torch_dtype(cfg.compute_dtype), device=device)


def shard(module: torch.nn.Module, ctx, cfg: LinearConfig) -> torch.nn.Module:
    """Apply FSDP2 to ``module`` over all ranks with the configured mixed precision."""
    fully_shard, MixedPrecisionPolicy = fsdp_api()
    policy = MixedPrecisionPolicy(
        param_dtype=torch_dtype(cfg.param_dtype), reduce_dtype=torch_dtype(cfg.reduce_dtype)
    )
    return fully_shard(module, mesh=ctx.mesh(), mp_policy=policy)


def local_shard_of(original: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """The rows of ``original`` that FSDP2's Shard(0) gives ``rank`` (torch.chunk semantics)."""
    chunks = torch.chunk(original, world_size, dim=0)
    if rank < len(chunks):
        return chunks[rank]
    return original.new_empty((0, *original.shape[1:]))


@dataclass
class ForwardWeight:
    """The weight a module's forward received, as it received it."""

    tensor: torch.Tensor | None = None
    type_name: str | None = None
    has_quant_state: bool | None = None

    def describe(self) -> dict[str, Any]:
        return {"type": self.type_name, "has_quant_state": self.has_quant_state}


def capture_forward_weight(module: torch.nn.Module) -> tuple[ForwardWeight, Any]:
    """Copy ``module.weight`` at the moment ``forward`` starts.

    Registered after ``fully_shard``, this pre-hook runs after FSDP2's own pre-forward
    hook has swapped the unsharded parameter in, so it sees exactly what
    ``Linear4bit.forward`` sees. The copy matters: FSDP2 frees that storage on reshard.
    """
    captured = ForwardWeight()

    def hook(mod, args):
        weight = mod.weight
        captured.tensor = plain(weight).clone()
        captured.type_name = type(weight).__name__
        captured.has_quant_state = getattr(weight, "quant_state", None) is not None

    return captured, module.register_forward_pre_hook(hook)


class _PlainCarrier(torch.nn.Module):
    """A frozen parameter and nothing else: FSDP2's unshard with no bitsandbytes in the path."""

    def __init__(self, data: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(data, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def plain_carrier_control(original: torch.Tensor, ctx, cfg: LinearConfig) -> dict[str, Any]:
    """The same unshard of a plain parameter holding the very bits of ``original``.

    Differs from the probe's run in one thing only, bitsandbytes: same shape, dtype, mesh and
    mixed-precision policy. If it alters the same bytes, the culprit is FSDP2's unshard; if it
    keeps them, the culprit is on bitsandbytes' side of the path."""
    from fsdpqdiag.evidence.bytes import diff

    carrier = _PlainCarrier(original.clone())
    shard(carrier, ctx, cfg)
    captured, handle = capture_forward_weight(carrier)
    carrier(torch.zeros(1, device=original.device))
    handle.remove()
    found = diff(original, captured.tensor)
    carrier.reshard()
    return {
        "outcome": "byte-true" if found.get("bytes_equal") else "altered",
        **{k: found.get(k) for k in ("differing_bytes", "differing_elements", "post_bit_patterns")},
    }


def agreed_flags(flags: list[bool], device) -> list[bool]:
    """``flags`` OR-ed over every rank, so that all ranks run the same control collectives
    (a rank that skipped one would leave its peers waiting in FSDP2's all-gather)."""
    import torch.distributed as dist

    if not flags or not dist.is_initialized() or dist.get_world_size() == 1:
        return list(flags)
    votes = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.MAX)
    return [bool(v) for v in votes.tolist()]


class _PlainCarriers(torch.nn.Module):
    """Frozen plain parameters (``w0``, ``w1``, ...) and nothing else: many weights' bits
    through one FSDP2 unshard, no bitsandbytes in the path."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        for index, data in enumerate(tensors):
            setattr(self, f"w{index}", torch.nn.Parameter(data, requires_grad=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def plain_carriers_control(originals: dict[str, torch.Tensor], mesh, **fsdp_kwargs) -> dict[str, Any]:
    """``plain_carrier_control`` for several weights at once, sharded with the caller's own
    ``fully_shard`` arguments (``mp_policy``, ``reshard_after_forward``): each weight's very
    bits, in its storage dtype, in a plain ``nn.Parameter`` of one module, one unshard.
    ``byte-true`` or ``altered`` overall, with the names of the weights it altered."""
    from fsdpqdiag.evidence.bytes import diff

    fully_shard, _ = fsdp_api()
    names = list(originals)
    carriers = _PlainCarriers([originals[name].clone() for name in names])
    fully_shard(carriers, mesh=mesh, **fsdp_kwargs)
    seen: dict[str, torch.Tensor] = {}

    def hook(mod, args) -> None:  # runs after FSDP2's pre-forward unshard
        for index, name in enumerate(names):
            seen[name] = plain(getattr(mod, f"w{index}")).clone()

    handle = carriers.register_forward_pre_hook(hook)
    first = next(iter(originals.values()))
    carriers(torch.zeros(1, device=first.device))
    handle.remove()
    carriers.reshard()
    found = {name: diff(originals[name], seen[name]) for name in names}
    altered = [name for name in names if not found[name].get("bytes_equal")]
    patterns: dict[str, int] = {}
    for name in altered:
        for pattern, count in (found[name].get("post_bit_patterns") or {}).items():
            patterns[pattern] = patterns.get(pattern, 0) + count
    return {
        "outcome": "altered" if altered else "byte-true",
        "weights": len(names),
        "altered_weights": altered,
        "differing_bytes": sum(found[n].get("differing_bytes") or 0 for n in names),
        "differing_elements": sum(found[n].get("differing_elements") or 0 for n in names),
        "post_bit_patterns": patterns,
    }


# The frozen integer parameters ``unshard_integer_params`` puts beside the float Linear.
def unshard_integer_params(cfg: LinearConfig, ctx, evidence: dict[str, Any], checkpoint) -> dict[str, Any]:
    """Frozen uint8 and int8 ``nn.Parameter``s beside a float ``nn.Linear`` through
    ``fully_shard`` and one unshard: a refusal (the exception and FSDP2's line), or each
    one's dtype and bytes after unshard. No bitsandbytes anywhere. ``checkpoint(stage)``
    records the stage about to run."""
    from fsdpqdiag.evidence.bytes import diff

    torch.manual_seed(cfg.weight_seed)
    module = torch.nn.Module()
    module.linear = torch.nn.Linear(cfg.in_features, cfg.out_features, bias=False)
    module.u8 = torch.nn.Parameter(
        torch.randint(0, 256, (cfg.out_features, cfg.in_features), dtype=torch.uint8), requires_grad=False
    )
    module.i8 = torch.nn.Parameter(
        torch.randint(-128, 128, (cfg.out_features, cfg.in_features), dtype=torch.int8), requires_grad=False
    )
    module = module.to(ctx.device)
    originals = {name: getattr(module, name).detach().clone() for name in INTEGER_PARAMS}
    checkpoint("fully_shard")
    try:
        shard(module, ctx, cfg)
    except Exception as exc:  # noqa: BLE001 - the stack's refusal is the finding
        evidence["fully_shard"] = RaisedStage.of(exc, "fully_shard").to_dict()
        return evidence
    evidence["fully_shard"] = {"status": "completed"}
    evidence["sharded_dtypes"] = {n: str(getattr(module, n).dtype) for n in INTEGER_PARAMS}
    checkpoint("unshard")
    module.unshard()
    for name in INTEGER_PARAMS:
        gathered = getattr(module, name)
        gathered = gathered.full_tensor() if hasattr(gathered, "full_tensor") else gathered
        entry = {
            "unsharded_dtype": str(gathered.dtype),
            "dtype_preserved": gathered.dtype == originals[name].dtype,
        }
        if entry["dtype_preserved"]:
            entry.update(diff(originals[name], gathered.detach().cpu().to(originals[name].device)))
        else:
            entry["bytes_equal"] = False
            entry["values_equal"] = bool(
                torch.equal(gathered.detach().to(originals[name].dtype), originals[name])
            )
        evidence[name] = entry
    module.reshard()
    return evidence


def plain_integer_control(cfg: LinearConfig, ctx, probe_evidence: dict[str, Any]) -> dict[str, Any]:
    """``unshard_integer_params`` as a control: did FSDP2 keep plain frozen integer
    parameters (``kept``), alter them (``altered``), or refuse them (``raised``)? A rank
    that dies in it keeps ``probe_evidence`` and names the control's stage."""

    def checkpoint(stage: str) -> None:
        ctx.checkpoint(f"control: plain integer parameters, {stage}", probe_evidence)

    measured = unshard_integer_params(cfg, ctx, {}, checkpoint)
    refusal = measured["fully_shard"]
    if refusal.get("status") == "raised":
        return {"outcome": "raised", "exception": refusal["exception"], "fsdp_frame": refusal["fsdp_frame"]}
    altered = [name for name in INTEGER_PARAMS if not measured[name].get("bytes_equal")]
    return {
        "outcome": "altered" if altered else "kept",
        "differing_bytes": sum(measured[name].get("differing_bytes") or 0 for name in INTEGER_PARAMS),
        "unsharded_dtypes": {name: measured[name]["unsharded_dtype"] for name in INTEGER_PARAMS},
    }
