"""The patches behind fsdpqdiag.stack.faults: each applies one fault to a real function of torch
(or to the rank's process) and returns the function that undoes it. Standard library at
import time; torch only inside the patches, which run on a rank."""

from __future__ import annotations

import ctypes
import os
import signal
import time
from collections.abc import Callable

# The bit pattern CUDA's float->bfloat16 conversion gives every NaN (#1945's 0x7FFF).
CANONICAL_BF16_NAN = 0x7FFF


def canonicalize_nans_(tensor) -> None:
    """Rewrite every NaN of a bf16 tensor to 0x7FFF in place, as a CUDA float round trip does."""
    import torch

    from fsdpqdiag.evidence.bytes import classify, plain

    storage = plain(tensor)
    if storage.dtype != torch.bfloat16:
        return
    nan = classify(storage) >= 2
    if not bool(nan.any()):
        return
    # FSDP2 writes unsharded parameters without bumping autograd's version counter; so
    # must a fault that stands in for one of its copies, or backward would refuse to run.
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(tensor):
        storage.view(-1).view(torch.int16)[nan] = CANONICAL_BF16_NAN


def _patch_attr(owner, name: str, replacement) -> Callable[[], None]:
    original = owner.__dict__[name]
    setattr(owner, name, replacement)

    def undo() -> None:
        setattr(owner, name, original)

    return undo


def nan_canonicalize(rank: int, world_size: int) -> Callable[[], None]:
    # FSDPParam.init_unsharded_param builds the parameter that forward sees from the
    # all-gather output, on every unshard and at every world size: the exact place where
    # a float-aware copy would corrupt the packed storage.
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    original = FSDPParam.init_unsharded_param

    def init_unsharded_param_canonicalizing(self):
        original(self)
        # Float-aware like the real culprit: only a copy that handles the bytes as a float
        # dtype canonicalizes; bytes all-gathered as integers pass untouched.
        buffers = getattr(self, "all_gather_outputs", None) or []
        if not buffers or buffers[0].dtype.is_floating_point:
            canonicalize_nans_(self._unsharded_param)

    return _patch_attr(FSDPParam, "init_unsharded_param", init_unsharded_param_canonicalizing)


def cast_integer_params(rank: int, world_size: int) -> Callable[[], None]:
    # What FSDP2 does to a uint8/int8 parameter when nothing guards it (axolotl's
    # init_dtype_attrs patch is that guard): the unsharded parameter comes out in the
    # mixed-precision dtype, so forward sees bf16 values instead of the integer bytes.
    import torch
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    original = FSDPParam.init_unsharded_param

    def init_unsharded_param_casting(self):
        original(self)
        param = self._unsharded_param
        if not param.dtype.is_floating_point:
            self._unsharded_param = torch.nn.Parameter(param.detach().to(torch.bfloat16), requires_grad=False)

    return _patch_attr(FSDPParam, "init_unsharded_param", init_unsharded_param_casting)


def drop_module_quant_state(rank: int, world_size: int) -> Callable[[], None]:
    # bitsandbytes as it was before its FSDP recovery had a source: quantization puts the
    # QuantState on the Params4bit only. The plain parameter FSDP2 swaps in for forward has
    # none, and fix_4bit_weight_quant_state_from_module finds no module copy to restore.
    from bitsandbytes.nn.modules import Params4bit

    original = Params4bit._quantize

    def quantize_without_module_copy(self, device):
        quantized = original(self, device)
        if self.module is not None:
            self.module.quant_state = None
        return quantized

    return _patch_attr(Params4bit, "_quantize", quantize_without_module_copy)


RECOVERED_WEIGHT_ATTR = "_fsdpqdiag_recovered_weight"


def stale_recovered_weight(rank: int, world_size: int) -> Callable[[], None]:
    # A recovery that restores quant_state on a *copy* of the unsharded weight and keeps
    # that copy on the module: forward computes with a tensor FSDP2 neither frees on reshard
    # nor refreshes on the next all-gather.
    import torch
    from bitsandbytes.nn import modules

    original = modules.fix_4bit_weight_quant_state_from_module

    def fix_keeping_a_copy(module) -> None:
        cached = module.__dict__.get(RECOVERED_WEIGHT_ATTR)
        if cached is None:
            if getattr(module.weight, "quant_state", None) is not None:
                return  # nothing was lost: leave the layer as bitsandbytes would
            original(module)
            weight = module.weight
            cached = modules.Params4bit(
                weight.detach().as_subclass(torch.Tensor).clone(),
                requires_grad=False,
                quant_state=weight.quant_state,
                quant_storage=module.quant_storage,
                bnb_quantized=True,
            )
            module.__dict__[RECOVERED_WEIGHT_ATTR] = cached
        module.weight = cached

    return _patch_attr(modules, "fix_4bit_weight_quant_state_from_module", fix_keeping_a_copy)


def keep_unsharded_after_reshard(rank: int, world_size: int) -> Callable[[], None]:
    # FSDP2's reshard losing its two steps for every parameter, plain ones included: the
    # module keeps the unsharded parameter and its storage stays allocated. The shard is
    # still all-gathered into that storage at the next unshard, so updates do arrive.
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam, ShardedState

    def to_sharded_keeping_unsharded(self) -> None:
        self.sharded_state = ShardedState.SHARDED

    return _patch_attr(FSDPParam, "to_sharded", to_sharded_keeping_unsharded)


def cast_mismatched_storage(rank: int, world_size: int) -> Callable[[], None]:
    # FSDPParam.init_dtype_attrs decides what mixed precision does to each parameter: it
    # clears param_dtype (no cast) when the parameter already has it or is not floating
    # point. Without that guard, packed uint8 storage and Int8Params whose dtype differs from
    # the policy's param_dtype are all-gathered cast by value, as float storage already is.
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    original = FSDPParam.init_dtype_attrs

    def init_dtype_attrs_unguarded(self, mp_policy):
        original(self, mp_policy)
        if mp_policy.param_dtype is not None and self.orig_dtype != mp_policy.param_dtype:
            self.param_dtype = mp_policy.param_dtype

    return _patch_attr(FSDPParam, "init_dtype_attrs", init_dtype_attrs_unguarded)


def refuse_integer_params(rank: int, world_size: int) -> Callable[[], None]:
    # torch up to 2.11 built each sharded parameter as nn.Parameter(dtensor), which requires
    # grad by default, and set the real flag after (the line axolotl's patch replaces):
    # a frozen uint8/int8 parameter is refused there, before anything is sharded.
    import torch
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    original = FSDPParam._init_sharded_param

    def init_sharded_param_as_torch_2_11(self, param, *args, **kwargs):
        if not (param.dtype.is_floating_point or param.dtype.is_complex):
            torch.nn.Parameter(param.detach())  # RuntimeError, from torch/nn/parameter.py
        return original(self, param, *args, **kwargs)

    return _patch_attr(FSDPParam, "_init_sharded_param", init_sharded_param_as_torch_2_11)


def swap_nibbles_(tensor) -> None:
    """Swap the two 4-bit codes of every byte of a uint8 tensor in place."""
    import torch

    from fsdpqdiag.evidence.bytes import plain

    storage = plain(tensor)
    if storage.dtype != torch.uint8:
        return
    # Like canonicalize_nans_, the write must not bump the version counter FSDP2 would not.
    with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(tensor):
        storage.copy_((storage << 4) | (storage >> 4))


def swap_packed_nibbles(rank: int, world_size: int) -> Callable[[], None]:
    # Packed 4-bit storage in uint8 (bitsandbytes' parametrize API, quant_storage=uint8)
    # holds two codes per byte; an unshard path that repacks them in the other order hands
    # dequantize a byte-plausible but wrong weight. Applied where FSDP2 builds the unsharded
    # parameter, on every unshard (the storage is refilled by each all-gather).
    import torch
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    original = FSDPParam.init_unsharded_param

    def init_unsharded_param_swapping(self):
        original(self)
        if self._unsharded_param.dtype == torch.uint8:
            swap_nibbles_(self._unsharded_param)
        elif hasattr(self._sharded_local_tensor, "fsdp_post_all_gather"):
            # A tensor subclass (torchao's NF4Tensor) is rebuilt around the all-gather outputs
            # themselves: its uint8 inner tensors (the packed codes) are these buffers.
            for buffer in getattr(self, "all_gather_outputs", None) or []:
                if buffer.dtype == torch.uint8:
                    swap_nibbles_(buffer)

    return _patch_attr(FSDPParam, "init_unsharded_param", init_unsharded_param_swapping)


def patch_gather_calls(action: Callable[[], None], ranks: Callable[[int, int], bool]):
    """Run ``action`` instead of DTensor's gather-to-replicate calls (Mechanism B's entry)."""

    def apply(rank: int, world_size: int) -> Callable[[], None]:
        from torch.distributed.tensor import DTensor

        if not ranks(rank, world_size):
            return lambda: None
        original_full, original_redistribute = DTensor.full_tensor, DTensor.redistribute

        def full_tensor(self, *args, **kwargs):
            action()
            return original_full(self, *args, **kwargs)

        def redistribute(self, *args, **kwargs):
            action()
            return original_redistribute(self, *args, **kwargs)

        undo_full = _patch_attr(DTensor, "full_tensor", full_tensor)
        undo_redistribute = _patch_attr(DTensor, "redistribute", redistribute)

        def undo() -> None:
            undo_full()
            undo_redistribute()

        return undo

    return apply


def crash_collectives(rank: int, world_size: int) -> Callable[[], None]:
    # A backend that cannot carry any tensor through the gathers FSDP2 and DTensor use, as
    # gloo with CUDA tensors (pytorch/pytorch#152645): all_gather_into_tensor,
    # DTensor.full_tensor() and redistribute() segfault on ordinary tensors as well.
    import torch.distributed as dist

    def all_gather_into_tensor(*args, **kwargs):
        segfault()

    undo_gather = _patch_attr(dist, "all_gather_into_tensor", all_gather_into_tensor)
    undo_dtensor = patch_gather_calls(segfault, every_rank)(rank, world_size)

    def undo() -> None:
        undo_dtensor()
        undo_gather()

    return undo


def segfault_when_wrapping_linear(rank: int, world_size: int) -> Callable[[], None]:
    # A crash confined to one configuration (per-Linear4bit wrapping, the matrix's cell D),
    # so a sweep must lose that cell only.
    import torch.distributed.fsdp as fsdp

    original = fsdp.fully_shard

    def fully_shard(module, *args, **kwargs):
        if type(module).__name__ == "Linear4bit":
            segfault()
        return original(module, *args, **kwargs)

    return _patch_attr(fsdp, "fully_shard", fully_shard)


def segfault() -> None:
    # A genuine invalid read, so the signal comes from the kernel as it would from a bad
    # native kernel, not from a Python-level kill.
    ctypes.string_at(0)


def abort() -> None:
    os.abort()


def oom_kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hang() -> None:
    while True:
        time.sleep(3600)


def raise_() -> None:
    raise RuntimeError("injected fault: exception raised on this rank only")


def every_rank(rank: int, world_size: int) -> bool:
    return True


def last_rank(rank: int, world_size: int) -> bool:
    return rank == world_size - 1
