"""On each rank: the collectives FSDP2 and DTensor use, run on ordinary bf16 (every NaN
payload included) and uint8/int8 tensors and compared byte for byte; bitsandbytes' kernel
path and the CPU flags that select it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from fsdpqdiag.analyses.preflight.names import (
    ALL_GATHER,
    ALL_REDUCE,
    FULL_TENSOR,
    ISA_FLAGS,
    OPTIONAL_KERNEL_PACKAGES,
    PAYLOAD_FINITE,
    REDISTRIBUTE,
    REDUCE_SCATTER,
)


def cpu_isa_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, bool] | None:
    """The flags of ``ISA_FLAGS`` this CPU has, or None where /proc/cpuinfo is absent."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("flags"):
            present = set(line.split(":", 1)[1].split())
            return {flag: flag in present for flag in ISA_FLAGS}
    return None


def bitsandbytes_path(device_type: str) -> dict[str, Any]:
    """The kernel path bitsandbytes takes for ``device_type`` and what selected it."""
    from fsdpqdiag.stack import bnb_cpu_path

    info: dict[str, Any] = {"device": device_type}
    try:
        from bitsandbytes import cextension
    except Exception as exc:  # noqa: BLE001 - recorded, not raised
        info.update(backend=None, kernel_path=None, error=f"{type(exc).__name__}: {exc}")
        return info
    backend = getattr(cextension, "BNB_BACKEND", None)
    cpu = bnb_cpu_path.describe()
    if device_type == "cuda":
        kernel_path = "rocm" if backend == "ROCm" else "cuda"
    elif device_type == "cpu":
        kernel_path = cpu["path"]
    else:
        kernel_path = (backend or device_type).lower()
    native = getattr(getattr(cextension, "lib", None), "_lib", None)
    info.update(
        backend=backend,
        kernel_path=kernel_path,
        native_library=getattr(native, "_name", None),
        cpu=cpu,
        isa_flags=cpu_isa_flags(),
        optional_kernel_packages={
            name: importlib.util.find_spec(name) is not None for name in OPTIONAL_KERNEL_PACKAGES
        },
    )
    return info


def _bf16_payload(rank: int):
    """Every bf16 NaN payload (254), ±inf, ±0 and rank-dependent finite values, as bf16."""
    import torch

    mantissas = torch.arange(1, 128, dtype=torch.int32)
    nans = torch.cat([0x7F80 | mantissas, 0xFF80 | mantissas])
    specials = torch.tensor([0x7F80, 0xFF80, 0x0000, 0x8000], dtype=torch.int32)
    finite = torch.randn(PAYLOAD_FINITE - 4, generator=torch.Generator().manual_seed(rank))
    finite_bits = finite.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    bits = torch.cat([nans, specials, finite_bits])
    # int32 -> int16 keeps the low 16 bits: the patterns above 0x7fff come out negative.
    return bits.to(torch.int16).view(torch.bfloat16)


def _int_payload(rank: int, dtype):
    """All 256 byte values, rotated by rank so that ranks differ."""
    import torch

    return torch.roll(torch.arange(256, dtype=torch.int32), rank).to(torch.uint8).view(dtype)


def _gather_payloads(rank: int):
    import torch

    return {
        "bfloat16": _bf16_payload(rank),
        "uint8": _int_payload(rank, torch.uint8),
        "int8": _int_payload(rank, torch.int8),
    }


def _sum_payloads(rank: int, world_size: int):
    """Small integers whose sums every dtype holds exactly (a sum carries no NaN payload)."""
    import torch

    base = (torch.arange(64 * world_size) + rank) % 5
    return {
        "bfloat16": base.to(torch.bfloat16),
        "uint8": base.to(torch.uint8),
        "int8": (base - 2).to(torch.int8),
    }


def compare_bytes(expected, observed) -> dict[str, Any]:
    """Byte equality of two tensors, element by element, with the first difference."""
    import torch

    if expected.dtype != observed.dtype or expected.shape != observed.shape:
        return {
            "bytes_equal": False,
            "elements": expected.numel(),
            "mismatch": f"{observed.dtype} {list(observed.shape)} != {expected.dtype} {list(expected.shape)}",
        }
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[expected.element_size()]
    left = expected.detach().cpu().contiguous().view(width)
    right = observed.detach().cpu().contiguous().view(width)
    differing = (left != right).nonzero().flatten()
    found: dict[str, Any] = {
        "bytes_equal": differing.numel() == 0,
        "elements": expected.numel(),
        "differing_elements": int(differing.numel()),
    }
    if differing.numel():
        index = int(differing[0])
        mask = (1 << (8 * expected.element_size())) - 1
        found["first_difference"] = {
            "index": index,
            "expected": hex(int(left[index]) & mask),
            "observed": hex(int(right[index]) & mask),
        }
    return found


def _check_all_gather(ctx, mesh) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    results = {}
    for dtype_name, local in _gather_payloads(ctx.rank).items():
        out = torch.empty(local.numel() * ctx.world_size, dtype=local.dtype, device=ctx.device)
        dist.all_gather_into_tensor(out, local.to(ctx.device))
        expected = torch.cat([_gather_payloads(r)[dtype_name] for r in range(ctx.world_size)])
        results[dtype_name] = compare_bytes(expected, out)
    return results


def _check_reduce_scatter(ctx, mesh) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    results = {}
    for dtype_name, local in _sum_payloads(ctx.rank, ctx.world_size).items():
        chunk = local.numel() // ctx.world_size
        out = torch.empty(chunk, dtype=local.dtype, device=ctx.device)
        dist.reduce_scatter_tensor(out, local.to(ctx.device))
        total = sum(
            _sum_payloads(r, ctx.world_size)[dtype_name].to(torch.int64) for r in range(ctx.world_size)
        )
        expected = total[ctx.rank * chunk : (ctx.rank + 1) * chunk].to(local.dtype)
        results[dtype_name] = compare_bytes(expected, out)
    return results


def _check_all_reduce(ctx, mesh) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    results = {}
    for dtype_name, local in _sum_payloads(ctx.rank, ctx.world_size).items():
        reduced = local.to(ctx.device).clone()
        dist.all_reduce(reduced)
        total = sum(
            _sum_payloads(r, ctx.world_size)[dtype_name].to(torch.int64) for r in range(ctx.world_size)
        )
        results[dtype_name] = compare_bytes(total.to(local.dtype), reduced)
    return results


def _dtensor_round_trip(ctx, mesh, gather) -> dict[str, Any]:
    import torch
    from torch.distributed.tensor import DTensor, Shard

    results = {}
    for dtype_name, local in _gather_payloads(ctx.rank).items():
        sharded = DTensor.from_local(local.to(ctx.device), mesh, [Shard(0)], run_check=False)
        expected = torch.cat([_gather_payloads(r)[dtype_name] for r in range(ctx.world_size)])
        results[dtype_name] = compare_bytes(expected, gather(sharded))
    return results


def _check_full_tensor(ctx, mesh) -> dict[str, Any]:
    return _dtensor_round_trip(ctx, mesh, lambda sharded: sharded.full_tensor())


def _check_redistribute(ctx, mesh) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate

    return _dtensor_round_trip(
        ctx, mesh, lambda sharded: sharded.redistribute(mesh, [Replicate()]).to_local()
    )


CHECKS = {
    ALL_GATHER: _check_all_gather,
    REDUCE_SCATTER: _check_reduce_scatter,
    ALL_REDUCE: _check_all_reduce,
    FULL_TENSOR: _check_full_tensor,
    REDISTRIBUTE: _check_redistribute,
}
