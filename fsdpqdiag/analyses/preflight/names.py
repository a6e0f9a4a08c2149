"""The names the preflight's parts share: its task, the capabilities it checks, and what
they are checked with. Standard library only."""

from __future__ import annotations

NAME = "preflight"


ALL_GATHER = "all_gather_into_tensor"


REDUCE_SCATTER = "reduce_scatter_tensor"


ALL_REDUCE = "all_reduce"


FULL_TENSOR = "DTensor.full_tensor()"


REDISTRIBUTE = "DTensor.redistribute(Replicate)"


CAPABILITIES = (ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE, FULL_TENSOR, REDISTRIBUTE)


UNITS_STAGE = "fsdp_units"


# What FSDP2 needs from every probe: its unshard all-gathers (torch 2.13 calls the same
# backend op through all_gather_single).
FSDP2_COLLECTIVES = (ALL_GATHER,)


# The CPU flags that decide bitsandbytes' CPU kernels and torch's bf16 paths.
ISA_FLAGS = (
    "avx2",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


# Packages bitsandbytes (or torch under it) picks kernels from when they are installed.
OPTIONAL_KERNEL_PACKAGES = ("kernels", "triton", "intel_extension_for_pytorch")


PAYLOAD_FINITE = 258  # with the 254 NaN patterns, 512 bf16 elements per rank


# All-gathered by value in one of these, packed storage meets a float copy (Mechanism A).
FLOAT_DTYPES = ("bfloat16", "float16", "float32", "float64")


COMPONENT = "process-group backend"


# Known upstream reports of a backend failing on ordinary tensors, by (device, backend).
KNOWN_ISSUES = {("cuda", "gloo"): ["pytorch/pytorch#152645"]}
