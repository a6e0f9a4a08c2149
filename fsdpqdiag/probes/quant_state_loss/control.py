"""quant-state-loss's same-launch control, and the FSDP2 look-ups it shares with the probe.

The probe's findings have two suspects. FSDP2 swaps a plain ``nn.Parameter`` into
``module.weight`` for forward, which drops whatever Python state the original parameter
object carried (``Params4bit`` defines no ``fsdp_pre_all_gather``), and on reshard puts its
sharded parameter back and frees the unsharded storage. bitsandbytes'
``fix_4bit_weight_quant_state_from_module`` then wraps the swapped-in parameter in a new
``Params4bit`` carrying ``module.quant_state`` and *assigns it to* ``module.weight``.

The control differs from the probe in that recovery only: the same cycle (fully_shard,
forward, reshard, an update written into the shard, forward again), the same mesh and
mixed-precision policy, the very bits of the packed weight in its storage dtype, held by a
``Parameter`` subclass that carries a ``quant_state`` attribute and keeps it through
``torch.chunk``/``split`` as ``Params4bit`` does, on a module that keeps its own copy as
``Linear4bit`` does -- but no bitsandbytes, so nothing reassigns ``module.weight``. It says

- whether FSDP2 hands forward a parameter without the attribute for *any* subclass (then the
  loss is FSDP2's documented swap, and restoring it is the recovery's job);
- whether the module attribute the recovery reads survives ``fully_shard`` (if not, FSDP2
  took the recovery's only source);
- whether FSDP2 keeps ownership of a weight nobody reassigns: its sharded parameter back and
  the storage freed on reshard, an update of the shard seen by the next forward. An
  ownership finding the control shares is FSDP2's; one it does not is the recovery's.
"""

from __future__ import annotations

from typing import Any

CONTROL = "plain_subclass_parameter_same_bits"


def fsdp_param_of(module, param_name: str):
    """FSDP2's ``FSDPParam`` for ``module.<param_name>`` (private torch API), or None."""
    state = module._get_fsdp_state()
    group = getattr(state, "_fsdp_param_group", None)
    for fsdp_param in getattr(group, "fsdp_params", None) or []:
        info = fsdp_param._module_info
        if info.module is module and info.param_name == param_name:
            return fsdp_param
    return None


def unsharded_of(fsdp_param):
    return getattr(fsdp_param, "_unsharded_param", None) if fsdp_param is not None else None


def storage_bytes(tensor) -> int:
    from fsdpqdiag.evidence.bytes import plain

    return int(plain(tensor).untyped_storage().nbytes())


def same_storage(a, b) -> bool | None:
    """Whether two tensors share one allocated storage (None if either is missing)."""
    from fsdpqdiag.evidence.bytes import plain

    if a is None or b is None:
        return None
    first, second = plain(a).untyped_storage(), plain(b).untyped_storage()
    return first.nbytes() > 0 and first.data_ptr() == second.data_ptr()


def differing_elements(a, b) -> int:
    """Containers whose bits differ (every one, if shape or dtype changed)."""
    from fsdpqdiag.evidence.bytes import element_bits

    if a.dtype != b.dtype or a.numel() != b.numel():
        return max(a.numel(), b.numel())
    return int((element_bits(a) != element_bits(b)).sum())


def _carrier(original, quant_state):
    """A module like ``Linear4bit`` without bitsandbytes: its weight a ``Parameter``
    subclass with a ``quant_state`` attribute, a module copy of it, a forward that reads the
    weight and reassigns nothing."""
    import torch

    class StatefulParameter(torch.nn.Parameter):
        def __new__(cls, data, quant_state=None):
            self = torch.Tensor._make_subclass(cls, data, False)
            self.quant_state = quant_state
            return self

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            # Params4bit's rule: chunks of the weight (FSDP2's sharding) keep the state.
            result = super().__torch_function__(func, types, args, kwargs or {})
            if func in (torch.chunk, torch.split) and isinstance(result, tuple):
                return tuple(cls(chunk, args[0].quant_state) for chunk in result)
            return result

    class Carrier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = StatefulParameter(original.clone(), quant_state)
            self.quant_state = quant_state

        def forward(self, x):
            return x  # FSDP2 unshards before any forward; reading the weight adds nothing

    return Carrier()


def _forward(module, x, captured: dict) -> None:
    from fsdpqdiag.evidence.bytes import plain

    def hook(mod, args) -> None:  # after FSDP2's pre-forward unshard
        captured.update(
            weight=plain(mod.weight).clone(),
            type=type(mod.weight).__name__,
            has_quant_state=getattr(mod.weight, "quant_state", None) is not None,
        )

    handle = module.register_forward_pre_hook(hook)
    module(x)
    handle.remove()


def plain_subclass_control(original, ctx, cfg) -> dict[str, Any]:
    """Run the control (see the module docstring): ``kept`` where FSDP2 kept ownership of
    the weight, ``broken`` with its findings where it did not, ``raised`` where a step raised."""
    try:
        return _measure(original, ctx, cfg)
    except Exception as exc:  # noqa: BLE001 - the stack's failure is the control's result
        return {"outcome": "raised", "exception": f"{type(exc).__name__}: {exc}"}


def _measure(original, ctx, cfg) -> dict[str, Any]:
    import torch

    from fsdpqdiag.evidence.bytes import diff, plain
    from fsdpqdiag.probes.common import local_shard_of, shard

    sentinel = object()  # stands for a QuantState: only its identity matters
    module = _carrier(original, sentinel)
    shard(module, ctx, cfg)
    fsdp_param = fsdp_param_of(module, "weight")
    x = torch.zeros(1, device=original.device)
    first: dict = {}
    _forward(module, x, first)
    module.reshard()
    unsharded = unsharded_of(fsdp_param)
    restored = fsdp_param is not None and module.weight is fsdp_param.sharded_param
    freed = unsharded is None or storage_bytes(unsharded) == 0
    with torch.no_grad():  # the probe's update: each rank reverses its rows of the shard
        rows = plain(fsdp_param.sharded_param if fsdp_param is not None else module.weight)
        rows.copy_(rows.flip(0))
    updated = torch.cat([local_shard_of(original, r, ctx.world_size).flip(0) for r in range(ctx.world_size)])
    second: dict = {}
    _forward(module, x, second)
    stale = differing_elements(updated, second["weight"])
    module.reshard()
    findings = [
        *([] if restored else ["module.weight is not FSDP2's sharded parameter after reshard"]),
        *([] if freed else [f"{storage_bytes(unsharded)} bytes of the unsharded weight stay allocated"]),
        *([f"forward after an update of the shard saw {stale} stale elements"] if stale else []),
    ]
    return {
        "outcome": "broken" if findings else "kept",
        "findings": findings,
        "differing_bytes": diff(original, first["weight"]).get("differing_bytes"),
        "handed_type": first["type"],
        "handed_has_quant_state": first["has_quant_state"],
        "module_copy_survives": getattr(module, "quant_state", None) is sentinel,
        "restored_sharded_param": restored,
        "memory_freed": freed,
        "stale_elements": stale,
    }
