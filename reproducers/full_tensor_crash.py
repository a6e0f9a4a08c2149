"""Standalone reproducer of bitsandbytes #1945, Mechanism B (torch + bitsandbytes only).

After FSDP2 ``fully_shard`` of a bf16-packed ``Linear4bit``, call ``full_tensor()`` and
``redistribute([Replicate()])`` on the weight. #1945 saw both die by SIGSEGV. Each rank
names each call on stderr before making it (so a crash leaves the last call named); rank 0
prints one verdict line for the run (``--json`` adds each rank's measurements, one JSON
object a line). The exit status is 1 where it reproduces (a call returns wrong bytes, or a
rank dies in one: torchrun then exits 1 without a verdict line), 0 where both calls return
every byte on every rank.

    torchrun --nproc-per-node 2 reproducers/full_tensor_crash.py            # CPU/gloo or GPU/NCCL
    python reproducers/full_tensor_crash.py --device cpu                    # world size 1

Mirrors fsdpqdiag's ``full-tensor-crash`` probe (same seeds, same defaults); a test checks
both report the same evidence.
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
try:
    from torch.distributed.tensor import Replicate
except ImportError:
    from torch.distributed._tensor import Replicate
from torch.distributed.device_mesh import init_device_mesh


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
        "MASTER_PORT": "29532",
    }.items():
        os.environ.setdefault(key, value)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
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
    original = linear.weight.detach().as_subclass(torch.Tensor).clone()
    fully_shard(
        linear,
        mesh=init_device_mesh(device.type, (world_size,)),
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    )
    linear(x.to(torch.bfloat16).to(device))
    linear.reshard()

    def same_bytes(tensor):
        return bool(torch.equal(original.view(torch.int16), tensor.contiguous().view(torch.int16)))

    result = {
        "rank": rank,
        "world_size": world_size,
        "torch": torch.__version__,
        "bitsandbytes": bnb.__version__,
    }
    print(f"rank {rank}: calling full_tensor()", file=sys.stderr, flush=True)
    result["full_tensor_bytes_equal"] = same_bytes(linear.weight.full_tensor())
    print(f"rank {rank}: calling redistribute([Replicate()])", file=sys.stderr, flush=True)
    replicated = linear.weight.redistribute(placements=[Replicate()])
    result["redistribute_bytes_equal"] = same_bytes(replicated.to_local())
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
    """The run's exit status and its one line: 1 REPRODUCED, 0 NOT REPRODUCED."""
    first = ranks[0]
    head = f"ws={first['world_size']} {device} torch {first['torch']} bitsandbytes {first['bitsandbytes']}"
    wrong = [
        (r["rank"], call)
        for r in ranks
        for call, key in (
            ("full_tensor()", "full_tensor_bytes_equal"),
            ("redistribute([Replicate()])", "redistribute_bytes_equal"),
        )
        if not r[key]
    ]
    if wrong:
        rank, call = wrong[0]
        return 1, f"REPRODUCED {head}: {call} completed but returned wrong bytes on rank {rank}"
    calls = "full_tensor() and redistribute([Replicate()])"
    return 0, f"NOT REPRODUCED {head}: {calls} completed on every rank, byte-true"


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown: a gloo worker thread can still be freeing the last
    # all-gather's Python-owned tensors then, and taking the GIL during finalization makes it
    # std::terminate (SIGABRT) after the results above were printed (seen on CPU under load).
    sys.stdout.flush()
    os._exit(status)
