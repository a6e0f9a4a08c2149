"""Standalone reproducer of bitsandbytes #1945, Mechanism A (torch + bitsandbytes only).

Does the weight that ``Linear4bit.forward`` receives after FSDP2 ``fully_shard`` keep
every byte of the packed-NF4 bf16 storage? Rank 0 prints one verdict line for the run
(``--json`` adds each rank's measurements, one JSON object a line); the exit status is 1
where it reproduces (forward receives altered bytes and the output changes), 0 where it does
not, 2 where bytes and output disagree (no conclusion).

    torchrun --nproc-per-node 2 reproducers/nan_canonicalization.py            # CPU/gloo or GPU/NCCL
    python reproducers/nan_canonicalization.py --device cpu                    # world size 1

Mirrors fsdpqdiag's ``nan-canonicalization`` probe (same seeds, same defaults); a test
checks both report the same evidence.
"""

import argparse
import json
import os
import sys

import bitsandbytes as bnb
import torch
import torch.distributed as dist

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import init_device_mesh


def nan_mask(bits):  # bf16: exponent all ones, mantissa non-zero
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x007F) != 0)


def compare(original, observed):
    before = original.contiguous().view(-1).view(torch.int16)
    after = observed.detach().contiguous().view(-1).view(torch.int16).to(before.device)
    positions = torch.nonzero(before != after).view(-1)
    patterns, counts = torch.unique(after[positions], return_counts=True)
    return {
        "differing_bytes": int((before.view(torch.uint8) != after.view(torch.uint8)).sum()),
        "differing_elements": int(positions.numel()),
        "differing_nan_class": int(nan_mask(before[positions]).sum()),
        "post_bit_patterns": {f"0x{p & 0xFFFF:04x}": c for p, c in zip(patterns.tolist(), counts.tolist())},
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--out-features", type=int, default=1024)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--weight-seed", type=int, default=42)
    parser.add_argument("--input-seed", type=int, default=123)
    parser.add_argument("--backend", choices=["gloo", "nccl"], help="default: nccl on cuda, gloo on cpu")
    parser.add_argument("--json", action="store_true", help="also print each rank's measurements")
    args = parser.parse_args()
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29531",
    }.items():
        os.environ.setdefault(key, value)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    # Ranks beyond the visible GPUs share them (gloo allows it): two ranks on one GPU is how a
    # one-GPU machine runs world size 2.
    device = (
        torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        if args.device == "cuda"
        else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend or ("nccl" if device.type == "cuda" else "gloo"))

    torch.manual_seed(args.weight_seed)
    linear = bnb.nn.Linear4bit(
        args.in_features,
        args.out_features,
        bias=False,
        quant_type="nf4",
        compute_dtype=torch.bfloat16,
        quant_storage=torch.bfloat16,
        compress_statistics=True,
    ).to(device)
    x = torch.randn(2, args.in_features, generator=torch.Generator().manual_seed(args.input_seed))
    x = x.to(torch.bfloat16).to(device)
    y_pre = linear(x).detach().clone()
    original = linear.weight.detach().as_subclass(torch.Tensor).clone()

    fully_shard(
        linear,
        mesh=init_device_mesh(device.type, (world_size,)),
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    )
    local = linear.weight._local_tensor  # outside forward: inside it, self.weight is FSDP2's swap target
    seen = {}
    linear.register_forward_pre_hook(
        lambda m, a: seen.update(w=m.weight.detach().as_subclass(torch.Tensor).clone())
    )
    y_post = linear(x).detach()
    linear.reshard()
    backend = dist.get_backend()
    # full_tensor() on gloo with CUDA tensors dies by SIGSEGV in gloo itself (pytorch#152645),
    # a crash of the backend, not of this bug: the verdict does not need it, so it is skipped.
    gloo_on_cuda = backend == "gloo" and device.type == "cuda"
    full = None if gloo_on_cuda else linear.weight.full_tensor()

    delta = (y_post.float() - y_pre.float()).abs()
    result = {
        "rank": rank,
        "world_size": world_size,
        "torch": torch.__version__,
        "bitsandbytes": bnb.__version__,
        "elements": original.numel(),
        "nan_elements": int(nan_mask(original.view(-1).view(torch.int16)).sum()),
        "swap_target": compare(original, seen["w"]),
        "local_tensor": compare(torch.chunk(original, world_size, dim=0)[rank], local),
        "full_tensor": compare(original, full) if full is not None else "skipped: gloo with CUDA tensors",
        "max_abs_delta": float(delta.max()),
        "mean_abs_delta": float(delta.mean()),
        "output_bit_equal": bool(torch.equal(y_pre.view(torch.int16), y_post.view(torch.int16))),
    }
    ranks = [None] * world_size
    dist.all_gather_object(ranks, result)  # rank 0 speaks for the run, in one line
    dist.destroy_process_group()
    status, line = verdict(ranks, device.type)
    if rank == 0:
        if args.json:
            for each in ranks:
                print(json.dumps(each), flush=True)
        print(line, flush=True)
    return status


def verdict(ranks, device):
    """The run's exit status and its one line: 1 REPRODUCED, 0 NOT REPRODUCED, 2 INCONCLUSIVE."""
    first = ranks[0]
    altered = sum(r["swap_target"]["differing_elements"] for r in ranks)
    changed = not all(r["output_bit_equal"] for r in ranks)
    patterns = sorted({p for r in ranks for p in r["swap_target"]["post_bit_patterns"]})
    detail = (
        f"ws={first['world_size']} {device} torch {first['torch']} bitsandbytes {first['bitsandbytes']}: "
        f"{altered} elements (all ranks) differ in the weight forward receives, "
        f"{first['nan_elements']} of {first['elements']} original elements NaN-class; "
        f"post bits {', '.join(patterns[:3]) or '-'}; max |dy| = {max(r['max_abs_delta'] for r in ranks)}"
    )
    if altered and changed:
        return 1, f"REPRODUCED {detail}"
    if not altered and not changed:
        return 0, f"NOT REPRODUCED {detail}"
    return 2, f"INCONCLUSIVE {detail}; bytes and output disagree"


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown: a gloo worker thread can still be freeing the last
    # all-gather's Python-owned tensors then, and taking the GIL during finalization makes it
    # std::terminate (SIGABRT) after the results above were printed (seen on CPU under load).
    sys.stdout.flush()
    os._exit(status)
