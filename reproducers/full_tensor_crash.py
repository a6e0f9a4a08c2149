"""Standalone reproducer of bitsandbytes #1945, Mechanism B (torch + bitsandbytes only).

After FSDP2 ``fully_shard`` of a bf16-packed ``Linear4bit``, call ``full_tensor()`` and
``redistribute([Replicate()])`` on the weight. #1945 saw both die by SIGSEGV. Prints one
JSON line per rank *before* each call (so a crash leaves the last call named) and one
with the result.

    torchrun --nproc-per-node 2 reproducers/full_tensor_crash.py
    python reproducers/full_tensor_crash.py --device cpu
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
        torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    torch.manual_seed(42)
    linear = bnb.nn.Linear4bit(
        args.in_features,
        args.out_features,
        bias=False,
        quant_type="nf4",
        compute_dtype=torch.bfloat16,
        quant_storage=torch.bfloat16,
        compress_statistics=True,
    ).to(device)
    x = torch.randn(2, args.in_features, generator=torch.Generator().manual_seed(123))
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
    print(json.dumps({"rank": rank, "calling": "full_tensor()"}), flush=True)
    result["full_tensor_bytes_equal"] = same_bytes(linear.weight.full_tensor())
    print(json.dumps({"rank": rank, "calling": "redistribute([Replicate()])"}), flush=True)
    replicated = linear.weight.redistribute(placements=[Replicate()])
    result["redistribute_bytes_equal"] = same_bytes(replicated.to_local())
    print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: a gloo worker thread can still be freeing the last
    # all-gather's Python-owned tensors then, and taking the GIL during finalization makes it
    # std::terminate (SIGABRT) after the results above were printed (seen on CPU under load).
    sys.stdout.flush()
    os._exit(0)
