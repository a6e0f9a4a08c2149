"""What the weight guard costs in a real QLoRA training step, and what a per-op hash sees.

Run as ranks of one job::

    torchrun --nproc-per-node 2 benchmarks/guard_cost.py --preset tiny-llama --device cpu
    torchrun --nproc-per-node 1 benchmarks/guard_cost.py --preset tinyllama-1.1b --device cuda

Variants, built side by side from the same preset (NF4, bf16 storage, LoRA, ``fully_shard`` per
decoder layer then the root, bf16 MixedPrecisionPolicy, SGD on the adapters): ``vanilla``;
``guard`` (``fsdpqdiag.guard(params="quantized", every=1)``); ``debugmode`` (the same step under
``torch.utils._debug_mode.DebugMode`` with ``log_tensor_hashes``, PyTorch's per-op hashing, where
the installed torch has it). Steps are interleaved round-robin so drift hits every variant alike;
medians over rounds; peak memory of a step above what was allocated before it (CUDA only; on
CPU the guard's own resident allocation is reported instead). Then the detection question on
the same tensors: a real packed weight before and after FSDP2-style NaN canonicalization,
hashed by DebugMode's two hash functions and by the guard's digest. Rank 0 prints one JSON
object and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsdpqdiag.evidence.bytes import plain  # noqa: E402
from fsdpqdiag.probes.common import fsdp_api  # noqa: E402
from fsdpqdiag.rank import env
from fsdpqdiag.stack import models
from fsdpqdiag.stack.faults import canonicalize_nans_  # noqa: E402
from fsdpqdiag.weightguard import digest as guard_digest
from fsdpqdiag.weightguard import guard as weight_guard


def build(preset: str, device: torch.device, mesh, policy):
    fully_shard, _ = fsdp_api()
    model = models.load_quantized(models.preset_dir(preset), models.QuantConfig(), device)
    model = models.apply_lora(model)
    model.train()
    for unit in [*models.decoder_layers(model), model]:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def debug_mode_context():
    try:
        from torch.utils._debug_mode import DebugMode
    except ImportError:
        return None

    @contextlib.contextmanager
    def per_op_hashing():
        with DebugMode(record_output=False), DebugMode.log_tensor_hashes(hash_fn="norm", hash_inputs=True):
            yield

    return per_op_hashing


def detection(model) -> dict:
    """The same tensor, original and altered two ways: which hash tells them apart?"""
    from fsdpqdiag.evidence.bytes import nan_census

    full = None
    for _name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit":
            continue
        param = module.weight  # sharded after fully_shard: a DTensor, gathered byte-true by gloo/NCCL
        full = plain(param.full_tensor()) if hasattr(param, "full_tensor") else plain(param)
        if nan_census(full)["nan_elements"]:
            break
    canonicalized = full.clone()
    canonicalize_nans_(canonicalized)
    # Two containers of different bits trade places: the same multiset of bits, other positions.
    swapped = full.clone()
    flat = swapped.view(-1)
    bits = flat.view(torch.int16)
    other = int(torch.nonzero(bits != bits[0])[0])
    flat[[0, other]] = flat[[other, 0]]
    found: dict = {"weight": _name, "nan_elements": nan_census(full)["nan_elements"]}
    hashes = {"fsdpqdiag_digest": lambda t: f"{guard_digest.host(guard_digest.digest(t)):016x}"}
    try:
        from torch.utils._debug_mode import hash_tensor_fn, norm_hash_fn

        hashes["debugmode_norm"] = lambda t: repr(norm_hash_fn(t, use_scalar=True))
        hashes["debugmode_hash_tensor"] = lambda t: repr(hash_tensor_fn(t, use_scalar=True))
    except ImportError as exc:
        found["debugmode"] = f"unavailable: {exc}"
    alterations = {"nan_canonicalization": canonicalized, "swap_two_elements": swapped}
    for label, fn in hashes.items():
        before = fn(full)
        found[label] = {
            name: {"before": before, "after": fn(altered), "caught": fn(altered) != before}
            for name, altered in alterations.items()
        }
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--no-debugmode", action="store_true", help="leave the per-op hashing variant out")
    args = parser.parse_args()
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = args.device == "cuda"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    if rank == 0:
        models.preset_dir(args.preset)  # build the preset once before the others read it
    dist.barrier()
    _, MixedPrecisionPolicy = fsdp_api()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (world_size,))

    per_op = None if args.no_debugmode else debug_mode_context()
    names = ["vanilla", "guard"] + (["debugmode"] if per_op else [])
    variants = {name: build(args.preset, device, mesh, policy) for name in names}
    guard = weight_guard.guard(variants["guard"][0], params="quantized", action="raise", every=1)
    contexts = {name: contextlib.nullcontext for name in names}
    if per_op:
        contexts["debugmode"] = per_op
    ids = models.fixed_input(variants["vanilla"][0].config.vocab_size, args.batch, args.seq_len).to(device)

    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, list[int]] = {name: [] for name in names}
    failed: dict[str, str] = {}
    for round_index in range(args.warmup + args.rounds):
        for name, (model, optimizer) in list(variants.items()):
            if name in failed:
                continue
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            dist.barrier()
            started = time.perf_counter()
            try:
                with contexts[name]():
                    loss = model(input_ids=ids, labels=ids).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            except Exception as exc:  # noqa: BLE001 - a per-op hashing mode this stack cannot run
                if name == "vanilla" or name == "guard":
                    raise
                failed[name] = f"{type(exc).__name__}: {exc}"[:500]
                continue
            if cuda:
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            if round_index >= args.warmup:
                times[name].append(elapsed)
                if cuda:
                    peaks[name].append(torch.cuda.max_memory_allocated() - resident)
    names = [name for name in names if name not in failed]
    state = guard.close()
    table_bytes = sum(t.numel() * t.element_size() for t in guard_digest._TABLES.values())
    param_bytes = sum(plain(p).numel() * plain(p).element_size() for p in variants["guard"][0].parameters())
    caught = detection(variants["vanilla"][0])

    base_time = statistics.median(times["vanilla"])
    base_peak = statistics.median(peaks["vanilla"]) if peaks["vanilla"] else None
    rows = []
    for name in names:
        median = statistics.median(times[name])
        peak = statistics.median(peaks[name]) if peaks[name] else None
        rows.append(
            {
                "variant": name,
                "median_step_s": round(median, 5),
                "min_step_s": round(min(times[name]), 5),
                "max_step_s": round(max(times[name]), 5),
                "step_overhead_pct": round(100 * (median / base_time - 1), 2),
                "peak_step_mem_mib": None if peak is None else round(peak / 2**20, 1),
                "peak_mem_overhead_pct": None
                if peak is None or not base_peak
                else round(100 * (peak / base_peak - 1), 2),
            }
        )
    if rank == 0:
        stack = env.capture()
        result = {
            "benchmark": "guard_cost",
            "preset": args.preset,
            "world_size": world_size,
            "device": args.device,
            "rounds": args.rounds,
            "batch": args.batch,
            "seq_len": args.seq_len,
            "rows": rows,
            "failed": failed,
            "guard": {
                "guarded_weights": len(state["guarded"]),
                "checks_per_rank": sum(g["checks"] for g in state["guarded"]),
                "findings": len(state["findings"]),
                "setup_s": state["setup_s"],
                "hook_s_per_step": round(state["hook_s"] / max(state["steps"], 1), 6),
                "hook_pct_of_vanilla_step": round(
                    100 * state["hook_s"] / max(state["steps"], 1) / statistics.median(times["vanilla"]), 2
                ),
                "multiplier_table_bytes": table_bytes,
                "shard_param_bytes": param_bytes,
                "resident_pct_of_shard_params": round(100 * table_bytes / param_bytes, 2),
            },
            "detection": caught,
            "stack": {
                "torch": stack["torch"]["version"],
                "bitsandbytes": stack["bitsandbytes"]["version"],
                "gpus": stack["gpus"],
                "cpu_count": os.cpu_count(),
            },
        }
        print(json.dumps(result))
        print(f"{'variant':<11}{'median step s':>15}{'overhead %':>12}{'peak MiB':>10}{'mem overhead %':>16}")
        for row in rows:
            print(
                f"{row['variant']:<11}{row['median_step_s']:>15}{row['step_overhead_pct']:>12}"
                f"{str(row['peak_step_mem_mib']):>10}{str(row['peak_mem_overhead_pct']):>16}"
            )
        print(f"guard hook time per step (rank 0): {result['guard']['hook_s_per_step'] * 1e3:.2f} ms")
        for label in ("debugmode_norm", "debugmode_hash_tensor", "fsdpqdiag_digest"):
            if label in caught:
                seen = ", ".join(f"{alteration} {v['caught']}" for alteration, v in caught[label].items())
                print(f"{label:<24} caught: {seen}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
