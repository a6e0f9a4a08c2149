"""What each workaround costs: step time and peak memory next to vanilla FSDP2.

Run as ranks of one job, e.g. on two GPUs::

    torchrun --nproc-per-node 2 benchmarks/fix_cost.py --preset tinyllama-1.1b --device cuda
    torchrun --nproc-per-node 2 benchmarks/fix_cost.py --preset tiny-llama --device cpu

Every variant (vanilla FSDP2, each workaround) is built once, side by side, and the
training steps are interleaved round-robin — vanilla, cached-ref, fsdp2-bytes, … ,
vanilla, … — so drift of clocks or of the machine hits every variant alike. Reported:
the median step time over rounds, its overhead over vanilla, and the peak memory of a
step above what was allocated before it (CUDA only). Rank 0 prints one JSON object
and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fsdpqdiag import fixes
from fsdpqdiag.probes.common import fsdp_api  # noqa: E402
from fsdpqdiag.rank import env
from fsdpqdiag.stack import models


def build(preset: str, storage: str, device: torch.device):
    model = models.load_quantized(
        models.preset_dir(preset), models.QuantConfig(quant_storage=storage), device
    )
    model = models.apply_lora(model)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tinyllama-1.1b")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if args.device == "cuda"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank == 0:
        models.preset_dir(args.preset)  # build the preset once before the others read it
    dist.barrier()

    fully_shard, MixedPrecisionPolicy = fsdp_api()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    mesh = torch.distributed.device_mesh.init_device_mesh(device.type, (world_size,))
    variants = {}
    unavailable = {}
    for name in ["vanilla", *fixes.FIXES]:
        fix = fixes.NONE if name == "vanilla" else fixes.get(name)
        try:
            model = build(args.preset, fix.build_overrides.get("quant_storage", "bfloat16"), device)
            handle = fix.prepare(model)
            for unit in [*models.decoder_layers(model), model]:
                fully_shard(unit, mesh=mesh, mp_policy=policy)
        except Exception as exc:  # noqa: BLE001 - a variant this stack cannot shard is a finding
            unavailable[name] = f"{type(exc).__name__}: {exc}"
            continue
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        variants[name] = (model, handle, optimizer)
    ids = models.fixed_input(variants["vanilla"][0].config.vocab_size, args.batch, args.seq_len).to(device)

    times: dict[str, list[float]] = {name: [] for name in variants}
    peaks: dict[str, list[int]] = {name: [] for name in variants}
    for round_index in range(args.warmup + args.rounds):
        for name, (model, handle, optimizer) in variants.items():
            handle.apply()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            dist.barrier()
            started = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
            handle.undo()
            if round_index >= args.warmup:
                times[name].append(elapsed)
                if device.type == "cuda":
                    peaks[name].append(torch.cuda.max_memory_allocated() - resident)

    vanilla_time = statistics.median(times["vanilla"])
    vanilla_peak = statistics.median(peaks["vanilla"]) if peaks["vanilla"] else None
    rows = []
    for name in variants:
        median = statistics.median(times[name])
        peak = statistics.median(peaks[name]) if peaks[name] else None
        rows.append(
            {
                "variant": name,
                "median_step_s": round(median, 5),
                "step_overhead_pct": round(100 * (median / vanilla_time - 1), 2),
                "peak_step_mem_mib": None if peak is None else round(peak / 2**20, 1),
                "peak_mem_overhead_pct": None
                if peak is None or not vanilla_peak
                else round(100 * (peak / vanilla_peak - 1), 2),
            }
        )
    if rank == 0:
        stack = env.capture()
        print(
            json.dumps(
                {
                    "benchmark": "fix_cost",
                    "preset": args.preset,
                    "world_size": world_size,
                    "device": args.device,
                    "rounds": args.rounds,
                    "batch": args.batch,
                    "seq_len": args.seq_len,
                    "rows": rows,
                    "unavailable": unavailable,
                    "stack": {
                        "torch": stack["torch"]["version"],
                        "bitsandbytes": stack["bitsandbytes"]["version"],
                        "gpus": stack["gpus"],
                    },
                }
            )
        )
        print(f"{'variant':<15}{'median step s':>15}{'overhead %':>12}{'peak MiB':>10}{'mem overhead %':>16}")
        for row in rows:
            print(
                f"{row['variant']:<15}{row['median_step_s']:>15}{row['step_overhead_pct']:>12}"
                f"{str(row['peak_step_mem_mib']):>10}{str(row['peak_mem_overhead_pct']):>16}"
            )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
