"""What the weight guard costs in a real QLoRA training step, and what a per-op hash sees.

Run as ranks of one job::

    torchrun --nproc-per-node 2 benchmarks/guard_cost.py --preset tiny-llama --device cpu
    torchrun --nproc-per-node 1 benchmarks/guard_cost.py --preset tinyllama-1.1b --device cuda

Variants, built side by side from the same preset (NF4, bf16 storage, LoRA, ``fully_shard`` per
decoder layer then the root, bf16 MixedPrecisionPolicy, SGD on the adapters): ``vanilla``;
``guard`` (``fsdpqdiag.guard(params="quantized", every=1)``: a hook per FSDP unit, the word
digest: one Triton kernel per unit on a GPU, numpy on a CPU); ``guard-per-weight`` (the old
path: a hook per module, the per-element digest and its multiplier table); ``debugmode`` (the
same step under ``torch.utils._debug_mode.DebugMode`` with ``log_tensor_hashes``, PyTorch's
per-op hashing, where the installed torch has it; in the first ``--debugmode-rounds`` only, it
is an order of magnitude slower). Two phases of interleaved rounds, each variant stepping once
per round, the order reversed every other round: first vanilla against the guard alone (the
headline ratio, ``--rounds``), then vanilla against the old per-weight guard and DebugMode
(``--comparison-rounds``), so that no slower variant's steps fall between the guard's. Each
row's ratio is to its own phase's vanilla: the ratio of the medians and the median of each
round's own ratio, each with its 95 % bootstrap interval over the rounds.

Reported per variant: the median step and its ratio to vanilla's, the guard's host time in its
hooks per step, the bytes it keeps resident, the peak memory of a step above what was allocated
before it (CUDA only: the CPU allocator keeps no peak), and the bytes its hooks read per step
against the device's memory bandwidth (measured with a large read, or ``--bandwidth-gbs``): the
physical floor of any guard that reads every guarded weight once per step. Then the detection
question on the same tensors: a real packed weight before and after FSDP2-style NaN
canonicalization, a swap of two containers and one flipped bit, hashed by DebugMode's two hash
functions and by both of the guard's digests, and judged by the guard's hot path itself (on a
GPU the fused kernel). Rank 0 prints one JSON object and a table.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
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
from fsdpqdiag.weightguard import verify


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


def bandwidth_gbs(device: torch.device) -> float:
    """Read bandwidth of ``device`` in GB/s: the best of a few float32 sums (vectorized on every
    device) over 1 GiB (256 MiB on CPU). On a CPU it is what this process reads at its thread
    count, on a shared machine a lower bound."""
    words = (1 << 28) if device.type == "cuda" else (1 << 26)
    data = torch.ones(words, dtype=torch.float32, device=device)
    best = float("inf")
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        data.sum()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    del data
    return 4 * words / best / 1e9


def detection(model) -> dict:
    """The same tensor, original and altered three ways: which hash tells them apart?"""
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
    # One bit flipped in the middle of the weight: the lowest mantissa bit of one container.
    flipped = full.clone()
    middle = flipped.numel() // 2
    flipped.view(-1).view(torch.int16)[middle] ^= 1
    found: dict = {"weight": _name, "nan_elements": nan_census(full)["nan_elements"]}
    width = guard_digest.row_width(full.numel() * full.element_size())

    def word(t):
        return f"{guard_digest.host32(guard_digest.word_digest(guard_digest.raw_bytes(t), 0, width)):08x}"

    hashes = {
        "fsdpqdiag_digest": word,
        "fsdpqdiag_per_element_digest": lambda t: f"{guard_digest.host(guard_digest.digest(t)):016x}",
    }
    try:
        from torch.utils._debug_mode import hash_tensor_fn, norm_hash_fn

        hashes["debugmode_norm"] = lambda t: repr(norm_hash_fn(t, use_scalar=True))
        hashes["debugmode_hash_tensor"] = lambda t: repr(hash_tensor_fn(t, use_scalar=True))
    except ImportError as exc:
        found["debugmode"] = f"unavailable: {exc}"
    alterations = {
        "nan_canonicalization": canonicalized,
        "swap_two_elements": swapped,
        "one_bit_flip": flipped,
    }
    for label, fn in hashes.items():
        before = fn(full)
        found[label] = {
            name: {"before": before, "after": fn(altered), "caught": fn(altered) != before}
            for name, altered in alterations.items()
        }
    # The hook's own verdict on the altered bytes (a GPU's fused kernel, a CPU's numpy pass).
    hot_path = verify.single(full)
    found["guard_hot_path"] = {
        "path": hot_path.path,
        "unaltered_seen_as_altered": bool(hot_path.differs([full])),
    }
    found["fsdpqdiag_guard_hot_path"] = {
        name: {"caught": bool(hot_path.differs([altered]))} for name, altered in alterations.items()
    }
    return found


def run_phase(names, rounds: int, args, variants, contexts, ids, cuda: bool, guards: dict, limits=None):
    """Interleaved rounds of ``names``: every variant steps once per round, the order reversed
    every other round so that no variant always follows another. Before each step the
    collector runs, outside the timed region, so that where a full collection falls does not
    decide a step's time; inside it, garbage is collected as in any run. Each guard's hook
    time and step count when the warm-up ends (its kernel's first compile is not a step's
    cost) go into ``warm``. ``limits``: rounds after the warm-up a variant steps in, at most."""
    limits = limits or {}
    times: dict[str, list[float]] = {name: [] for name in names}
    peaks: dict[str, list[int]] = {name: [] for name in names}
    failed: dict[str, str] = {}
    for round_index in range(args.warmup + rounds):
        if round_index == args.warmup:
            for name in names:
                if name in guards:
                    guards[name].warm = (guards[name].hook_s, guards[name].step)
        for name in names if round_index % 2 == 0 else names[::-1]:
            if name in failed or round_index >= args.warmup + limits.get(name, rounds):
                continue
            model, optimizer = variants[name]
            gc.collect()
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
                if name.startswith(("vanilla", "guard")):
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
    return times, peaks, failed


def bootstrap_ci(pairs: list[tuple[float, float]], statistic, draws: int = 2000) -> list[float]:
    """The 95 % interval of ``statistic`` over (vanilla, variant) rounds resampled with
    replacement: how far the figure could move on another run of as many rounds."""
    generator = random.Random(0)
    values = sorted(statistic(generator.choices(pairs, k=len(pairs))) for _ in range(draws))
    return [round(values[int(0.025 * draws)], 4), round(values[int(0.975 * draws) - 1], 4)]


def ratio_of_medians(pairs) -> float:
    return statistics.median(t for _, t in pairs) / statistics.median(v for v, _ in pairs)


def median_round_ratio(pairs) -> float:
    return statistics.median(t / v for v, t in pairs)


def guard_row(guard, state: dict, base_time: float, bandwidth: float) -> dict:
    """What a guard spent: host time in its hooks, resident bytes, bytes its hooks read."""
    warm_hook_s, warm_steps = guard.warm
    steps = max(state["steps"] - warm_steps, 1)
    hook_s = state["hook_s"] - warm_hook_s
    sizes = {entry.name: entry.numel * entry.torch_dtype.itemsize for entry in guard.guarded}
    all_steps = max(state["steps"], 1)
    read = sum(sizes[g["parameter"]] * g["checks"] for g in state["guarded"]) / all_steps
    floor_s = read / (bandwidth * 1e9)
    return {
        "hot_path": guard.checks.path,
        "guarded_weights": len(state["guarded"]),
        "checks_per_step": round(sum(g["checks"] for g in state["guarded"]) / all_steps, 2),
        "findings": len(state["findings"]),
        # A hook that raised stops verifying its weights: a path that failed is not a cheap one.
        "errors": state["errors"],
        "setup_s": state["setup_s"],
        # After the warm-up rounds only.
        "hook_s_per_step": round(hook_s / steps, 6),
        "hook_pct_of_vanilla_step": round(100 * hook_s / steps / base_time, 3),
        "resident_bytes": guard.resident_bytes,
        "bytes_read_per_step": int(read),
        "read_floor_s_per_step": round(floor_s, 7),
        "read_floor_pct_of_vanilla_step": round(100 * floor_s / base_time, 4),
    }


def summarize(phase: str, names, times, peaks) -> list[dict]:
    """Per variant of one phase: its median step against that phase's vanilla, the median of
    each round's own ratio (the same round's vanilla step: drift between rounds cancels), and
    the 95 % bootstrap interval of both."""
    base_peak = statistics.median(peaks["vanilla"]) if peaks["vanilla"] else None
    rows = []
    for name in names:
        median = statistics.median(times[name])
        peak = statistics.median(peaks[name]) if peaks[name] else None
        delta = None if peak is None or base_peak is None else peak - base_peak
        pairs = list(zip(times["vanilla"], times[name]))
        rows.append(
            {
                "phase": phase,
                "variant": name,
                "steps": len(times[name]),
                "median_step_s": round(median, 5),
                "min_step_s": round(min(times[name]), 5),
                "max_step_s": round(max(times[name]), 5),
                # Against the vanilla steps of the same rounds (DebugMode steps in fewer).
                "ratio_to_vanilla": round(ratio_of_medians(pairs), 4),
                "ratio_ci95": bootstrap_ci(pairs, ratio_of_medians),
                "median_round_ratio": round(median_round_ratio(pairs), 4),
                "median_round_ratio_ci95": bootstrap_ci(pairs, median_round_ratio),
                "step_overhead_pct": round(100 * (ratio_of_medians(pairs) - 1), 2),
                "peak_step_mem_mib": None if peak is None else round(peak / 2**20, 1),
                "peak_mem_delta_mib": None if delta is None else round(delta / 2**20, 2),
                "peak_mem_overhead_pct": None
                if peak is None or not base_peak
                else round(100 * (peak / base_peak - 1), 3),
            }
        )  # fmt: skip
    return rows


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny-llama")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of vanilla against the guard")
    parser.add_argument(
        "--comparison-rounds",
        type=int,
        default=8,
        help="rounds of vanilla against the old per-weight guard and DebugMode, after the guard's",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--no-debugmode", action="store_true", help="leave the per-op hashing variant out")
    parser.add_argument("--debugmode-rounds", type=int, default=4, help="rounds that step the per-op hashing")
    parser.add_argument("--no-per-weight", action="store_true", help="leave the old per-weight guard out")
    parser.add_argument(
        "--bandwidth-gbs",
        type=float,
        default=None,
        help="the device's memory bandwidth to state (else measured)",
    )
    return parser.parse_args()


def main() -> None:
    args = parse_args()
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
    bandwidth = args.bandwidth_gbs or bandwidth_gbs(device)

    per_op = None if args.no_debugmode else debug_mode_context()
    names = ["vanilla", "guard"] + ([] if args.no_per_weight else ["guard-per-weight"])
    names += ["debugmode"] if per_op else []
    variants = {name: build(args.preset, device, mesh, policy) for name in names}
    guards = {"guard": weight_guard.guard(variants["guard"][0], params="quantized", action="raise", every=1)}
    if "guard-per-weight" in variants:
        guards["guard-per-weight"] = weight_guard.Guard(
            variants["guard-per-weight"][0], params="quantized", action="raise", every=1, legacy=True
        )
    contexts = {name: contextlib.nullcontext for name in names}
    if per_op:
        contexts["debugmode"] = per_op
    ids = models.fixed_input(variants["vanilla"][0].config.vocab_size, args.batch, args.seq_len).to(device)

    # The guard against vanilla alone first: the headline ratio, with no slower variant's steps
    # (DebugMode's are ten times longer) between theirs. Then the comparison rows.
    headline = ["vanilla", "guard"]
    times, peaks, failed = run_phase(headline, args.rounds, args, variants, contexts, ids, cuda, guards)
    rows = summarize("guard", headline, times, peaks)
    bases = {"guard": statistics.median(times["vanilla"])}
    others = [name for name in names if name not in headline]
    if others:
        phase = ["vanilla", *others]
        limits = {"debugmode": args.debugmode_rounds}
        times, peaks, more = run_phase(
            phase, args.comparison_rounds, args, variants, contexts, ids, cuda, guards, limits
        )
        failed.update(more)
        rows += summarize("comparison", [name for name in phase if name not in failed], times, peaks)
        bases["guard-per-weight"] = statistics.median(times["vanilla"])
    spent = {name: guard_row(guard, guard.close(), bases[name], bandwidth) for name, guard in guards.items()}
    caught = detection(variants["vanilla"][0])
    if rank == 0:
        report(args, world_size, rows, failed, spent, caught, bandwidth)
    dist.destroy_process_group()


def report(args, world_size, rows, failed, spent, caught, bandwidth) -> None:
    stack = env.capture()
    result = {
        "benchmark": "guard_cost",
        "preset": args.preset,
        "world_size": world_size,
        "device": args.device,
        "rounds": args.rounds,
        "comparison_rounds": args.comparison_rounds,
        "debugmode_rounds": args.debugmode_rounds,
        # The machine's load (1, 5, 15 minutes) at the end: on a shared CPU it moves every figure.
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "batch": args.batch,
        "seq_len": args.seq_len,
        "bandwidth_gbs": round(bandwidth, 1),
        "bandwidth_source": "stated (--bandwidth-gbs)" if args.bandwidth_gbs else "measured (a large sum)",
        "rows": rows,
        "failed": failed,
        "guards": spent,
        "detection": caught,
        "stack": {
            "torch": stack["torch"]["version"],
            "bitsandbytes": stack["bitsandbytes"]["version"],
            "gpus": stack["gpus"],
            "cpu_count": os.cpu_count(),
        },
    }  # fmt: skip
    print(json.dumps(result))
    header = f"{'phase':<12}{'variant':<18}{'steps':>6}{'median step s':>15}{'ratio':>9}{'ratio 95 % CI':>18}"
    print(f"{header}{'round ratio':>13}{'peak MiB':>10}{'peak delta MiB':>16}")
    for row in rows:
        low, high = row["ratio_ci95"]
        print(
            f"{row['phase']:<12}{row['variant']:<18}{row['steps']:>6}{row['median_step_s']:>15}"
            f"{row['ratio_to_vanilla']:>9}{f'{low}-{high}':>18}{row['median_round_ratio']:>13}"
            f"{str(row['peak_step_mem_mib']):>10}{str(row['peak_mem_delta_mib']):>16}"
        )
    for name, guard in spent.items():
        print(
            f"{name} (rank 0, {guard['hot_path']}): hooks {guard['hook_s_per_step'] * 1e3:.3f} ms/step "
            f"({guard['hook_pct_of_vanilla_step']} % of vanilla), resident {guard['resident_bytes']} B, "
            f"reads {guard['bytes_read_per_step'] / 1e6:.2f} MB/step, "
            f"{guard['read_floor_s_per_step'] * 1e3:.4f} ms "
            f"at {bandwidth:.1f} GB/s ({guard['read_floor_pct_of_vanilla_step']} % of vanilla)"
        )
    for label in (
        "debugmode_norm",
        "debugmode_hash_tensor",
        "fsdpqdiag_per_element_digest",
        "fsdpqdiag_digest",
        "fsdpqdiag_guard_hot_path",
    ):
        if label in caught:
            seen = ", ".join(f"{alteration} {v['caught']}" for alteration, v in caught[label].items())
            print(f"{label:<30} caught: {seen}")


if __name__ == "__main__":
    main()
