"""Standalone reproducer: frozen uint8/int8 parameters beside float ones under FSDP2.

Sharded by ``fully_shard`` with a bf16 ``MixedPrecisionPolicy`` (torch only). After unshard,
are their dtype and every byte preserved? Rank 0 prints one verdict line for the run
(``--json`` adds each rank's measurements, one JSON object a line); the exit status is 1
where it reproduces (``fully_shard`` refuses the parameters, or unshard alters their bytes),
0 where not.

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
        return report(result, args.json, device.type)
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
    return report(result, args.json, device.type)


def report(result, with_json, device):
    """Rank 0 prints the run's verdict line (and each rank's measurements with ``--json``)."""
    ranks = [None] * result["world_size"]
    dist.all_gather_object(ranks, result)  # rank 0 speaks for the run, in one line
    dist.destroy_process_group()
    status, line = verdict(ranks, device)
    if result["rank"] == 0:
        if with_json:
            for each in ranks:
                print(json.dumps(each), flush=True)
        print(line, flush=True)
    return status


def verdict(ranks, device):
    """The run's exit status and its one line: 1 REPRODUCED, 0 NOT REPRODUCED."""
    first = ranks[0]
    head = f"ws={first['world_size']} {device} torch {first['torch']}"
    refused = [r for r in ranks if r["fully_shard"]["status"] == "raised"]
    if refused:
        which = ", ".join(str(r["rank"]) for r in refused)
        error = refused[0]["fully_shard"]["error"].splitlines()[0]
        refusal = f"fully_shard refused the frozen uint8/int8 parameters on rank(s) {which}"
        return 1, f"REPRODUCED {head}: {refusal}: {error}"
    detail = ", ".join(f"{n}: {first[n]['unsharded_dtype']}" for n in ("u8", "i8"))
    broken = sorted({n for r in ranks for n in ("u8", "i8") if not r[n]["bytes_equal"]})
    if broken:
        return 1, f"REPRODUCED {head}: after unshard {detail}; bytes altered in {broken}"
    return 0, f"NOT REPRODUCED {head}: after unshard {detail}; dtype and every byte preserved"


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown: a gloo worker thread can still be freeing the last
    # all-gather's Python-owned tensors then, and taking the GIL during finalization makes it
    # std::terminate (SIGABRT) after the results above were printed (seen on CPU under load).
    sys.stdout.flush()
    os._exit(status)
