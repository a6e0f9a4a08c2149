"""Standalone reproducer: frozen uint8/int8 parameters beside float ones under FSDP2
``fully_shard`` with a bf16 ``MixedPrecisionPolicy`` (torch only). After unshard, are their
dtype and every byte preserved? Prints one JSON line per rank.

    torchrun --nproc-per-node 2 reproducers/non_float_params.py               # CPU/gloo or GPU/NCCL
    python reproducers/non_float_params.py --device cpu                       # world size 1

Mirrors fsdpqdiag's ``non-float-params`` probe (same seed, same defaults); a test checks
both report the same evidence.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import init_device_mesh


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--out-features", type=int, default=1024)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--weight-seed", type=int, default=42)
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

    torch.manual_seed(args.weight_seed)
    shape = (args.out_features, args.in_features)
    module = torch.nn.Module()
    module.linear = torch.nn.Linear(args.in_features, args.out_features, bias=False)
    module.u8 = torch.nn.Parameter(torch.randint(0, 256, shape, dtype=torch.uint8), requires_grad=False)
    module.i8 = torch.nn.Parameter(torch.randint(-128, 128, shape, dtype=torch.int8), requires_grad=False)
    module = module.to(device)
    originals = {name: getattr(module, name).detach().clone() for name in ("u8", "i8")}
    result = {"rank": rank, "world_size": world_size, "torch": torch.__version__}
    try:
        fully_shard(
            module,
            mesh=init_device_mesh(device.type, (world_size,)),
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        )
    except RuntimeError as exc:  # torch <= 2.11 refuses integer parameters here
        result["fully_shard"] = {"status": "raised", "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(result), flush=True)
        return
    result["fully_shard"] = {"status": "completed"}
    module.unshard()
    for name, original in originals.items():
        gathered = getattr(module, name)
        gathered = gathered.full_tensor() if hasattr(gathered, "full_tensor") else gathered
        gathered = gathered.detach()
        same_dtype = gathered.dtype == original.dtype
        result[name] = {
            "unsharded_dtype": str(gathered.dtype),
            "dtype_preserved": same_dtype,
            "bytes_equal": bool(
                same_dtype and torch.equal(gathered.view(torch.uint8), original.view(torch.uint8))
            ),
        }
    module.reshard()
    print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: a gloo worker thread can still be freeing the last
    # all-gather's Python-owned tensors then, and taking the GIL during finalization makes it
    # std::terminate (SIGABRT) after the results above were printed (seen on CPU under load).
    sys.stdout.flush()
    os._exit(0)
