"""bitsandbytes #1945's workaround ("cached-ref"), as its author published it.

Capture each ``Linear4bit``'s QuantState before ``fully_shard``; after it, cache the
byte-true ``DTensor._local_tensor`` (outside forward: inside it FSDP2 has swapped in a
parameter without one); replace ``Linear4bit.forward`` by one that all-gathers those
local shards itself with ``dist.all_gather`` (uint8-safe: a collective moves bytes) and
calls ``bnb.matmul_4bit``. It bypasses FSDP2's unshard for the packed weights, so FSDP2
still all-gathers them too (unused), and the manual gather has no prefetch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fsdpqdiag.fixes.base import Handle, Workaround

if TYPE_CHECKING:
    import torch


def _gather_rows(local: torch.Tensor, total_rows: int) -> torch.Tensor:
    import torch
    import torch.distributed as dist

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size == 1:
        return local
    rows = -(-total_rows // world_size)  # FSDP2's Shard(0) pads every shard to this
    padded = local.new_zeros((rows, *local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded.contiguous())
    return torch.cat(gathered, dim=0)[:total_rows]


def prepare(model) -> Handle:
    import bitsandbytes as bnb

    quant_states = {
        name: module.weight.quant_state
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }
    original_forward = bnb.nn.Linear4bit.forward
    cached: list = []

    def forward(self, x):
        quant_state = getattr(self, "_fsdpqdiag_cached_qs", None)
        local = getattr(self, "_fsdpqdiag_cached_local", None)
        if quant_state is None or local is None:
            return original_forward(self, x)
        weight = _gather_rows(local.contiguous(), self._fsdpqdiag_rows)
        if x.dtype != weight.dtype and weight.dtype.is_floating_point:
            x = x.to(weight.dtype)
        return bnb.matmul_4bit(x, weight.t(), bias=self.bias, quant_state=quant_state)

    def apply() -> None:
        for name, module in model.named_modules():
            if name in quant_states and hasattr(module.weight, "_local_tensor"):
                module._fsdpqdiag_cached_local = module.weight._local_tensor
                module._fsdpqdiag_cached_qs = quant_states[name]
                module._fsdpqdiag_rows = module.weight.shape[0]
                cached.append(module)
        bnb.nn.Linear4bit.forward = forward

    def undo() -> None:
        bnb.nn.Linear4bit.forward = original_forward
        for module in cached:
            for attr in ("_fsdpqdiag_cached_local", "_fsdpqdiag_cached_qs", "_fsdpqdiag_rows"):
                module.__dict__.pop(attr, None)
        cached.clear()

    return Handle(apply_fn=apply, undo_fns=[undo])


WORKAROUND = Workaround(
    name="cached-ref",
    description="#1945's workaround: cached _local_tensor + QuantState, manual all_gather in forward",
    prepare=prepare,
    not_installable=(
        "it caches each Linear4bit's QuantState from the script's model before fully_shard and "
        "bypasses FSDP2's unshard, which is what the guard checks; apply it in the script with "
        "fsdpqdiag.fixes.get('cached-ref').prepare(model)"
    ),
)
