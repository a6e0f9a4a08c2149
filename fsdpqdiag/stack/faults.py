"""Injected faults: the positive controls that prove each detector is able to fail.

Each fault is a named, reversible patch of a *real* function of torch, applied inside a
rank before the probe runs. Probes never branch on whether a fault is active: a detector
that reports REPRODUCED under ``nan-canonicalize`` has seen real FSDP2 hand a real
``Linear4bit`` corrupted bytes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from fsdpqdiag.stack.fault_patches import (
    abort,
    cast_integer_params,
    cast_mismatched_storage,
    crash_collectives,
    drop_module_quant_state,
    every_rank,
    hang,
    keep_unsharded_after_reshard,
    last_rank,
    nan_canonicalize,
    oom_kill,
    patch_gather_calls,
    raise_,
    refuse_integer_params,
    segfault,
    segfault_when_wrapping_linear,
    stale_recovered_weight,
    swap_packed_nibbles,
)

# What nan-canonicalize does to a tensor, which the tests use as ground truth.
from fsdpqdiag.stack.fault_patches import canonicalize_nans_ as canonicalize_nans_


@dataclass(frozen=True)
class Fault:
    name: str
    description: str
    # apply(rank, world_size) patches and returns the function that undoes the patch.
    apply: Callable[[int, int], Callable[[], None]]
    # True where the fault stands for a broken stack, which ordinary tensors meet too: the
    # preflight runs with it. The others stand for bugs of quantized weights and leave the
    # preflight's plain tensors alone (the gather faults would otherwise hit them).
    stack_wide: bool = False

    @contextlib.contextmanager
    def active(self, rank: int, world_size: int) -> Iterator[None]:
        undo = self.apply(rank, world_size)
        try:
            yield
        finally:
            undo()


FAULTS: dict[str, Fault] = {
    fault.name: fault
    for fault in (
        Fault(
            "nan-canonicalize",
            "the copy that builds FSDP2's unsharded parameter from a float all-gather buffer turns "
            "every bf16 NaN into 0x7FFF",
            nan_canonicalize,
        ),
        Fault(
            "cast-integer-params",
            "FSDP2's unsharded uint8/int8 parameters come out in bf16, as without axolotl's "
            "init_dtype_attrs guard",
            cast_integer_params,
        ),
        Fault(
            "refuse-integer-params",
            "fully_shard refuses frozen uint8/int8 parameters, as torch up to 2.11 does: its "
            "FSDPParam._init_sharded_param builds nn.Parameter(dtensor), which requires grad",
            refuse_integer_params,
        ),
        Fault(
            "drop-module-quant-state",
            "Linear4bit keeps no module copy of its QuantState, so bitsandbytes' recovery cannot "
            "restore the quant_state the weight loses under FSDP2",
            drop_module_quant_state,
        ),
        Fault(
            "stale-recovered-weight",
            "bitsandbytes' recovery swaps in a copy of the unsharded weight and reuses it in later "
            "forwards: memory kept after reshard, updates to the shard never seen",
            stale_recovered_weight,
        ),
        Fault(
            "keep-unsharded-after-reshard",
            "FSDP2's reshard leaves every parameter's unsharded tensor on its module and its storage "
            "allocated, plain parameters too (the positive control of quant-state-loss's own control)",
            keep_unsharded_after_reshard,
        ),
        Fault(
            "cast-mismatched-storage",
            "FSDP2's init_dtype_attrs loses its non-float guard (as in the torch versions axolotl "
            "patches): every parameter whose dtype differs from MixedPrecisionPolicy.param_dtype, "
            "uint8 packed 4-bit storage and Int8Params included, is all-gathered cast by value",
            cast_mismatched_storage,
        ),
        Fault(
            "swap-packed-nibbles",
            "the copy that builds FSDP2's unsharded parameter swaps the two 4-bit codes of every "
            "byte of a uint8 parameter, or of a tensor subclass's all-gathered uint8 inner tensors "
            "(torchao's NF4Tensor.quantized_data): packed NF4/FP4 storage repacked in the wrong order",
            swap_packed_nibbles,
        ),
        Fault(
            "segfault",
            "every rank dies by SIGSEGV inside full_tensor()/redistribute() (Mechanism B)",
            patch_gather_calls(segfault, every_rank),
        ),
        Fault(
            "abort",
            "every rank dies by SIGABRT inside full_tensor()/redistribute()",
            patch_gather_calls(abort, every_rank),
        ),
        Fault(
            "oom-kill",
            "the last rank is SIGKILLed inside full_tensor(), as the OOM killer would",
            patch_gather_calls(oom_kill, last_rank),
        ),
        Fault(
            "crash-collective",
            "every rank dies by SIGSEGV inside all_gather_into_tensor, DTensor.full_tensor() and "
            "redistribute() for every tensor, ordinary ones too: a broken process-group backend "
            "(the preflight sees it; probes that rely on these collectives become UNSUPPORTED)",
            crash_collectives,
            stack_wide=True,
        ),
        Fault(
            "segfault-linear-wrap",
            "a rank dies by SIGSEGV when fully_shard is applied to a single Linear4bit (matrix cell D)",
            segfault_when_wrapping_linear,
        ),
        Fault(
            "hang",
            "the last rank never enters the full_tensor() collective; its peers wait in it",
            patch_gather_calls(hang, last_rank),
        ),
        Fault(
            "raise",
            "the last rank raises inside full_tensor(); its peers wait in the collective",
            patch_gather_calls(raise_, last_rank),
        ),
    )
}


def get(name: str) -> Fault:
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r} (known: {', '.join(FAULTS)})")
    return FAULTS[name]
