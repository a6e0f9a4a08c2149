"""A byte-true fix that keeps FSDP2's own all-gather, prefetch and resharding.

Why this design: ``fsdpqdiag localize`` names the op that alters the bytes on CUDA —
``torch._foreach_copy_`` on bf16, which computes through float (NaN -> 0x7FFF), called by
FSDP2's ``all_gather_copy_in`` at world size > 1. Packed 4-bit storage is not numbers, so
it should never travel as a float dtype. FSDP2 has a documented extension point for
exactly this — ``fsdp_pre_all_gather`` / ``fsdp_post_all_gather`` on the sharded local
tensor, which torchao's NF4Tensor uses — and re-reads it at lazy init ("allow monkey patch
after init"). This fix declares, for each ``Linear4bit.weight`` with float storage, that
its all-gather input is the same bytes viewed as an integer dtype of the same width
(int16 for bf16/fp16: same shape, so uneven shards keep FSDP2's padded-size contract) and
that the gathered output is viewed back as the storage dtype. Every copy FSDP2 then makes
is an integer copy, which no kernel canonicalizes. FSDP2 still owns the collective, the
streams, prefetching and freeing; nothing is gathered twice. Mixed precision is not
applied to these parameters, which is right for packed storage (casting it destroys it),
as axolotl's ``init_dtype_attrs`` guard also concludes.
"""

from __future__ import annotations

import sys
import weakref

from fsdpqdiag.fixes.base import Handle, Workaround

_MARK = "_fsdpqdiag_bytes_all_gather"
_HOOKS = ("fsdp_pre_all_gather", "fsdp_post_all_gather")


def _install(fsdp_param) -> None:
    import torch

    local = fsdp_param._sharded_local_tensor
    storage_dtype = local.dtype
    carrier = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[local.element_size()]

    def fsdp_pre_all_gather(mesh, outer_size, outer_stride, module, mp_policy):
        padded = fsdp_param._sharded_param_data.view(fsdp_param.padded_sharded_param_size)
        return (padded.view(carrier),), storage_dtype

    def fsdp_post_all_gather(all_gather_outputs, metadata, param_dtype, *, out=None):
        (gathered,) = all_gather_outputs
        unsharded = gathered.view(metadata)
        if out is not None:
            # Later unshards refill the same storage; copy only if FSDP2 handed us another.
            if out.data_ptr() != unsharded.data_ptr():
                out.view(carrier).view(-1)[: gathered.numel()].copy_(gathered.view(-1))
            return None
        return unsharded, (gathered,)

    local.fsdp_pre_all_gather = fsdp_pre_all_gather
    local.fsdp_post_all_gather = fsdp_post_all_gather


def _packed_weight(fsdp_param) -> bool:
    module = fsdp_param._module_info.module
    return (
        getattr(module, _MARK, False)
        and fsdp_param._module_info.param_name == "weight"
        and fsdp_param._sharded_local_tensor.dtype.is_floating_point
    )


def _fsdp_params(model):
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        group = get_state()._fsdp_param_group if get_state else None
        if group is not None:
            yield from group.fsdp_params


def prepare(model) -> Handle:
    import bitsandbytes as bnb
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    marked = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    original_init_extensions = FSDPParam._init_extensions

    def init_extensions(self) -> None:
        # FSDP2 re-runs this at lazy init, after it may have replaced the local tensor.
        if _packed_weight(self):
            _install(self)
        original_init_extensions(self)

    def apply() -> None:
        for module in marked:
            setattr(module, _MARK, True)
        FSDPParam._init_extensions = init_extensions
        for fsdp_param in _fsdp_params(model):
            fsdp_param._init_extensions()

    def undo() -> None:
        FSDPParam._init_extensions = original_init_extensions
        for fsdp_param in _fsdp_params(model):
            if _packed_weight(fsdp_param):
                local = fsdp_param._sharded_local_tensor
                for hook in _HOOKS:
                    local.__dict__.pop(hook, None)
                original_init_extensions(fsdp_param)
        for module in marked:
            module.__dict__.pop(_MARK, None)

    return Handle(apply_fn=apply, undo_fns=[undo])


def _linear4bit_weight(fsdp_param) -> bool:
    """A ``Linear4bit.weight`` with float storage, in any model (no mark needed). A process
    that never imported bitsandbytes has none, and is not made to import it."""
    bnb = sys.modules.get("bitsandbytes")
    info = fsdp_param._module_info
    return (
        bnb is not None
        and info.param_name == "weight"
        and isinstance(info.module, bnb.nn.Linear4bit)
        and fsdp_param._sharded_local_tensor.dtype.is_floating_point
    )


def install() -> Handle:
    """Process-wide: every ``Linear4bit.weight`` FSDP2 wraps from now on (and, at lazy init,
    those wrapped before the first forward) all-gathers its bytes as integers."""
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    original_init_extensions = FSDPParam._init_extensions
    installed: weakref.WeakSet = weakref.WeakSet()

    def init_extensions(self) -> None:
        if _linear4bit_weight(self):
            _install(self)
            installed.add(self)
        original_init_extensions(self)

    def undo() -> None:
        FSDPParam._init_extensions = original_init_extensions
        for fsdp_param in list(installed):
            local = fsdp_param._sharded_local_tensor
            for hook in _HOOKS:
                local.__dict__.pop(hook, None)
            original_init_extensions(fsdp_param)
        installed.clear()

    FSDPParam._init_extensions = init_extensions
    return Handle(undo_fns=[undo])


WORKAROUND = Workaround(
    name="fsdp2-bytes",
    description="FSDP2-native: packed storage all-gathered as same-width integers (fsdp_pre/post_all_gather)",
    prepare=prepare,
    install=install,
)
