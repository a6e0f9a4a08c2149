"""Stack preflight: can this device, backend and world size run the probes at all?

Before a probe blames FSDP2 or bitsandbytes, the stack under them must carry ordinary
tensors: the collectives FSDP2 and DTensor use (``all_gather_into_tensor``,
``reduce_scatter_tensor``, ``all_reduce``, ``DTensor.full_tensor()`` and
``redistribute``) are run on plain bf16 (every NaN payload included) and uint8/int8
tensors and checked byte for byte. Beside them: which kernel path bitsandbytes takes on the
chosen device and the CPU flags that select it, and, per FSDP unit of the model under test,
the dtype FSDP2 will all-gather in — by value in the parameters' dtype when every input
shares one, by bytes through uint8 when they differ, so which units expose packed storage
to a float copy depends on how the model is wrapped.

The checks run as a rank task through the launcher: a collective that kills its ranks
(gloo on CUDA segfaults in allgather, pytorch/pytorch#152645) is a failed capability and
a relaunch carries on with the next one. A probe whose precondition failed here is
UNSUPPORTED, never CRASHED or REPRODUCED: the stack, not the bug, decided it.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Any

from fsdpqdiag.config import RankTask, RunConfig
from fsdpqdiag.probes.base import Needs, Probe, Verdict, failure_verdict, first_line

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


# --- on each rank -------------------------------------------------------------------


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
    from fsdpqdiag import bnb_cpu_path

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


def _all_gather_dtype(fsdp_params) -> tuple[str, list[str], str]:
    """The dtype FSDP2 all-gathers a param group in, its inputs' dtypes, and where that was read.

    FSDP2's own ``_get_all_gather_input_metadatas`` over each ``FSDPParam.all_gather_inputs``
    where this torch has them (no collective runs: they are the sharded inputs); else its
    rule applied to each parameter's ``param_dtype`` or sharded storage dtype.
    """
    try:
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import _get_all_gather_input_metadatas

        inputs = [fsdp_param.all_gather_inputs for fsdp_param in fsdp_params]
        input_dtypes, _, dtype = _get_all_gather_input_metadatas(inputs)
        names = [str(d).removeprefix("torch.") for ds in input_dtypes for d in ds]
        return str(dtype).removeprefix("torch."), names, "fsdp2"
    except Exception:  # noqa: BLE001 - older/newer FSDP2 internals: fall back to the rule
        names = [
            str(p.param_dtype or p._sharded_param_data.dtype).removeprefix("torch.") for p in fsdp_params
        ]
        return (names[0] if len(set(names)) == 1 else "uint8"), names, "rule"


def _param_groups(state) -> list:
    """An FSDP state's parameter groups: a list in newer torch (2.13 here), one group or
    None in torch 2.11 (seen on the H200), which has no ``_fsdp_param_groups``."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [group] if group is not None else []


def fsdp_units(units: list[tuple[str, Any]], quantized: set[tuple[int, str]]) -> list[dict[str, Any]]:
    """Per FSDP unit (after ``fully_shard``; the root last): parameter dtypes and how FSDP2
    all-gathers them."""
    # FSDP2 settles each parameter's param_dtype in the root's lazy init, the first step of
    # the first forward; it runs no collective, so it is run here as forward would run it.
    units[-1][1]._get_fsdp_state()._lazy_init()
    rows = []
    for unit_name, module in units:
        for group in _param_groups(module._get_fsdp_state()):
            params = group.fsdp_params
            if not params:
                continue
            dtype, input_dtypes, source = _all_gather_dtype(params)
            param_dtypes: dict[str, int] = {}
            for fsdp_param in params:
                name = str(fsdp_param.orig_dtype).removeprefix("torch.")
                param_dtypes[name] = param_dtypes.get(name, 0) + 1
            held = sum((id(p._module_info.module), p._module_info.param_name) in quantized for p in params)
            by_value = dtype != "uint8" or set(input_dtypes) == {"uint8"}
            rows.append(
                {
                    "unit": unit_name or "(root)",
                    "parameters": len(params),
                    "parameter_dtypes": param_dtypes,
                    "all_gather_input_dtypes": sorted(set(input_dtypes)),
                    "all_gather_dtype": dtype,
                    "all_gather_by": "value" if by_value else "bytes",
                    "quantized_parameters": held,
                    # Packed storage all-gathered by value in a float dtype meets float copies.
                    "packed_storage_exposed": bool(held and by_value and dtype in FLOAT_DTYPES),
                    "source": source,
                }
            )
    return rows


def _units_of_linear(config: dict[str, Any], ctx) -> dict[str, Any]:
    from fsdpqdiag.config import LinearConfig
    from fsdpqdiag.probes.common import build_linear4bit, shard

    cfg = LinearConfig(**config)
    linear, _ = build_linear4bit(cfg, ctx.device)
    quantized = {(id(linear), "weight")}
    shard(linear, ctx, cfg)
    return {
        "subject": f"Linear4bit {cfg.in_features}x{cfg.out_features}, quant_storage {cfg.quant_storage}",
        "wrapping": "fully_shard on the layer",
        "mp_policy": {"param_dtype": cfg.param_dtype, "reduce_dtype": cfg.reduce_dtype},
        "units": fsdp_units([("", linear)], quantized),
    }


def _units_of_model(config: dict[str, Any], ctx) -> dict[str, Any]:
    import torch

    from fsdpqdiag import models
    from fsdpqdiag.probes.common import fsdp_api

    quant = models.QuantConfig(
        bits=config.get("bits", 4),
        quant_type=config.get("quant_type", "nf4"),
        double_quant=config.get("double_quant", True),
        quant_storage=config.get("quant_storage", "bfloat16"),
    )
    model = models.load_quantized(Path(config["model"]), quant, ctx.device)
    if config.get("lora"):
        model = models.apply_lora(model)
    quantized = {
        (id(module), name.rsplit(".", 1)[1]) for name, module, _, _ in models.quantized_parameters(model)
    }
    # Wrapped as forensics and the matrix's default cell wrap it: per decoder layer, then root.
    fully_shard, MixedPrecisionPolicy = fsdp_api()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    layers = models.decoder_layers(model)
    names = {id(module): name for name, module in model.named_modules()}
    for layer in layers:
        fully_shard(layer, mesh=ctx.mesh(), mp_policy=policy)
    fully_shard(model, mesh=ctx.mesh(), mp_policy=policy)
    units = [(names[id(layer)], layer) for layer in layers] + [("", model)]
    return {
        "subject": config.get("label") or Path(config["model"]).name,
        "wrapping": "fully_shard per decoder layer, then the root",
        "mp_policy": {"param_dtype": "bfloat16", "reduce_dtype": "float32"},
        "units": fsdp_units(units, quantized),
    }


def run(config: dict[str, Any], ctx) -> dict[str, Any]:
    """One rank's preflight: each capability not in ``skip``, then (if asked) the FSDP units."""
    skip = set(config.get("skip", ()))
    evidence: dict[str, Any] = {"capabilities": {}}
    if ctx.rank == 0:
        evidence["bitsandbytes_path"] = bitsandbytes_path(ctx.device_type)
    mesh = None
    for name in CAPABILITIES:
        if name in skip:
            continue
        ctx.checkpoint(name, evidence)
        try:
            if mesh is None and name in (FULL_TENSOR, REDISTRIBUTE):
                mesh = ctx.mesh()
            evidence["capabilities"][name] = {"status": "completed", "dtypes": CHECKS[name](ctx, mesh)}
        except Exception as exc:  # noqa: BLE001 - a capability that raises is a finding
            evidence["capabilities"][name] = {"status": "raised", "error": f"{type(exc).__name__}: {exc}"}
    if config.get("units", True) and (config.get("model") or config.get("linear")):
        ctx.checkpoint(UNITS_STAGE, evidence)
        try:
            if config.get("model"):
                evidence[UNITS_STAGE] = _units_of_model(config["model"], ctx)
            else:
                evidence[UNITS_STAGE] = _units_of_linear(config["linear"], ctx)
        except Exception as exc:  # noqa: BLE001
            evidence[UNITS_STAGE] = {"error": f"{type(exc).__name__}: {first_line(str(exc)) or ''}"}
    return evidence


def _unused_verdict(outcomes) -> Verdict:
    raise NotImplementedError("the preflight has no verdict: preflight.run_preflight merges its ranks")


PROBE = Probe(
    name=NAME,
    description="stack preflight: collectives on ordinary tensors, bitsandbytes' path, FSDP units (internal)",
    run=run,
    verdict=_unused_verdict,
    needs=Needs(packages=()),
    stack_faults_only=True,
)


# --- in the parent: merge ranks, relaunch after a death -----------------------------


def _describe_dtypes(dtypes: dict[str, dict]) -> tuple[bool, str]:
    wrong = {name: found for name, found in dtypes.items() if not found.get("bytes_equal")}
    if not wrong:
        return True, f"bytes equal after the round trip ({', '.join(dtypes)})"
    parts = []
    for name, found in wrong.items():
        if "mismatch" in found:
            parts.append(f"{name}: came back {found['mismatch']}")
            continue
        first = found.get("first_difference") or {}
        parts.append(
            f"{name}: {found.get('differing_elements')} of {found.get('elements')} elements differ "
            f"(e.g. {first.get('expected')} -> {first.get('observed')})"
        )
    return False, "bytes differ: " + "; ".join(parts)


def _merge_completed(name: str, per_rank: list[dict]) -> dict[str, Any]:
    """One capability that every rank finished: ok only where every rank got every byte."""
    raised = [(rank, found) for rank, found in enumerate(per_rank) if found.get("status") == "raised"]
    if raised:
        rank, found = raised[0]
        return {"name": name, "ok": False, "detail": f"rank {rank} raised {first_line(found['error'])}"}
    details = [_describe_dtypes(found["dtypes"]) for found in per_rank]
    failing = [rank for rank, (ok, _) in enumerate(details) if not ok]
    if failing:
        return {
            "name": name,
            "ok": False,
            "detail": f"rank {failing[0]}: {details[failing[0]][1]}",
            "ranks": per_rank,
        }
    return {"name": name, "ok": True, "detail": details[0][1], "dtypes": per_rank[0]["dtypes"]}


def _ended(outcomes) -> tuple[str | None, str]:
    """The stage in which a launch broke, and how (from the same rules as a probe's CRASHED,
    TIMEOUT or ERROR)."""
    failed = failure_verdict(outcomes)
    assert failed is not None
    stage = failed.evidence.get("stage")
    return stage, failed.summary


def injected(run: RunConfig) -> str | None:
    """The fault the preflight runs under: the probes' own only where it stands for a broken
    stack; a fault confined to quantized weights would not meet its ordinary tensors (the
    rank applies the same rule, ``RankContext.fault_for``)."""
    from fsdpqdiag import faults

    return run.inject if run.inject and faults.get(run.inject).stack_wide else None


def run_preflight(
    run: RunConfig, subject: dict[str, Any], first: list | None = None, first_s: float = 0.0
) -> dict[str, Any]:
    """Every capability and the FSDP units on ``run``'s device, backend and world size.

    ``subject`` is ``{"linear": LinearConfig dict}`` or ``{"model": {...}}``: what the FSDP
    units are read from. ``first``: the preflight's per-rank outcomes from a launch it shared
    with the probes (``api``), if any; else it launches itself. After a launch in which ranks
    died, raised or hung inside a capability, that capability is failed with the reason and a
    fresh launch runs the rest.
    """
    from fsdpqdiag.launch import run_task

    started = time.monotonic() - first_s
    shared = first is not None
    done: dict[str, dict] = {}
    units: dict[str, Any] | None = None if subject else {}
    bnb: dict[str, Any] | None = None
    launches = 0
    while True:
        pending = [name for name in CAPABILITIES if name not in done]
        if not pending and units is not None:
            break
        if first is not None:
            outcomes, first = first, None
        else:
            config = {"skip": list(done), "units": units is None, **subject}
            outcomes = run_task(RankTask(probe=NAME, probe_config=config, run=run))
            launches += 1
        bnb = bnb or outcomes[0].evidence.get("bitsandbytes_path")
        for name in pending:
            per_rank = [(o.evidence.get("capabilities") or {}).get(name) for o in outcomes]
            if all(per_rank):
                done[name] = _merge_completed(name, per_rank)
        if units is None and all(UNITS_STAGE in o.evidence for o in outcomes):
            units = outcomes[0].evidence[UNITS_STAGE]
        if all(o.status == "ok" for o in outcomes):
            continue
        stage, how = _ended(outcomes)
        if stage in CAPABILITIES and stage not in done:
            done[stage] = {"name": stage, "ok": False, "detail": how}
        elif stage == UNITS_STAGE and units is None:
            units = {"error": how}
        else:  # the ranks did not get to a capability: nothing after can be learned here
            for name in CAPABILITIES:
                done.setdefault(name, {"name": name, "ok": False, "detail": how})
            units = units if units is not None else {"error": how}
    return {
        "world_size": run.world_size,
        "device": run.device,
        "backend": run.backend,
        "injected": injected(run),
        "capabilities": [done[name] for name in CAPABILITIES],
        "bitsandbytes_path": bnb,
        "fsdp_units": units or None,
        # Launches of its own, beside the probes' launch it shares where it ran first in it.
        "launches": launches,
        "shared_launch": shared,
        "duration_s": round(time.monotonic() - started, 3),
    }


def failed_capabilities(preflight: dict[str, Any], names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [c for c in preflight.get("capabilities", []) if c["name"] in names and not c["ok"]]


def instead(run: RunConfig) -> str:
    """What to run instead when the stack fails on ordinary tensors."""
    if run.device == "cuda" and run.backend == "gloo":
        return "use --backend nccl"
    if run.device == "cuda":
        return "use --backend gloo, or check NCCL (NCCL_DEBUG=INFO) before blaming FSDP2 or bitsandbytes"
    return "run on a GPU (--device cuda --backend nccl) or on another torch build"


def unsupported_verdict(probe: str, preconditions: tuple[str, ...], preflight: dict, run: RunConfig):
    """UNSUPPORTED with what failed and what to run instead, or None where every
    precondition held."""
    from fsdpqdiag.report import UNSUPPORTED

    failed = failed_capabilities(preflight, preconditions)
    if not failed:
        return None
    what = "; ".join(f"{c['name']} ({c['detail']})" for c in failed)
    summary = (
        f"{', '.join(c['name'] for c in failed)} on {run.backend} with {run.device} tensors fails in "
        f"preflight on ordinary tensors: {instead(run)} [{what}]"
    )
    evidence = {
        "preconditions": list(preconditions),
        "failed_preconditions": failed,
        "attribution": {
            "component": COMPONENT,
            "report_to": None,
            "known_issues": KNOWN_ISSUES.get((run.device, run.backend), []),
            "decided_by": [
                f"preflight {c['name']} at ws={run.world_size} on {run.device}/{run.backend}: {c['detail']}"
                for c in failed
            ],
        },
        "instead": instead(run),
    }
    return Verdict(UNSUPPORTED, summary, evidence)
