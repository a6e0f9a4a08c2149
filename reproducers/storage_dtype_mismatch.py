"""Standalone reproducer: ``Linear4bit`` whose ``quant_storage`` differs from FSDP2's ``param_dtype``.

The ``param_dtype`` of its ``MixedPrecisionPolicy`` (torch + bitsandbytes only).

For each (quant_storage, param_dtype) pair, on a fresh layer: does ``fully_shard``
succeed, does unshard (the all-gather) and forward run, which dtype does forward see, are
the packed bytes and the output (vs the same layer without FSDP) preserved? A failure is
recorded with its stage and the next pair still runs. Rank 0 prints one verdict line for
the run (``--json`` adds each rank's measurements, one JSON object a line); the exit status
is 1 where a mismatched pair breaks (it fails, or forward gets other bytes or gives another
output), 0 where every mismatched pair keeps bytes and output.

    torchrun --nproc-per-node 2 reproducers/storage_dtype_mismatch.py          # CPU/gloo or GPU/NCCL
    python reproducers/storage_dtype_mismatch.py --device cpu                  # world size 1

Mirrors fsdpqdiag's ``storage-dtype-mismatch`` probe (same seeds, same defaults, same
pairs); a test checks both report the same evidence.
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

# (quant_storage, param_dtype); the matching pair first, as the reference.
COMBINATIONS = [
    ("bfloat16", "bfloat16"),
    ("float16", "bfloat16"),
    ("float32", "bfloat16"),
    ("uint8", "bfloat16"),
    ("bfloat16", "float16"),
    ("bfloat16", "float32"),
]
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def raw(tensor):
    return tensor.detach().contiguous().view(-1).view(torch.uint8)


def compare(original, observed):
    """Bytes of what forward saw against the packed original, across a dtype change too."""
    same_size = raw(original).numel() == raw(observed).numel()
    differing = int((raw(original) != raw(observed)).sum()) if same_size else None
    cast_by_value = None
    if observed.dtype != original.dtype:
        cast_by_value = original.numel() == observed.numel() and bool(
            torch.equal(raw(original.to(observed.dtype)), raw(observed))
        )
    return {
        "dtype": str(observed.dtype).removeprefix("torch."),
        "bytes_equal": differing == 0,
        "differing_bytes": differing,
        "cast_by_value": cast_by_value,
    }


def run_pair(quant_storage, param_dtype, args, device, mesh):
    torch.manual_seed(args.weight_seed)
    linear = bnb.nn.Linear4bit(
        args.in_features,
        args.out_features,
        bias=False,
        quant_type="nf4",
        compute_dtype=torch.bfloat16,
        quant_storage=getattr(torch, quant_storage),
        compress_statistics=True,
    ).to(device)
    x = torch.randn(2, args.in_features, generator=torch.Generator().manual_seed(args.input_seed))
    x = x.to(torch.bfloat16).to(device)
    y_pre = linear(x).detach().clone()
    original = linear.weight.detach().as_subclass(torch.Tensor).clone()
    row = {
        "combination": f"{SHORT.get(quant_storage, quant_storage)}/{SHORT.get(param_dtype, param_dtype)}",
        "quant_storage": quant_storage,
        "param_dtype": param_dtype,
        "matching": quant_storage == param_dtype,
        "sharded": False,
        "failure": None,
    }
    seen = {}
    stage = "fully_shard"
    try:
        fully_shard(
            linear,
            mesh=mesh,
            mp_policy=MixedPrecisionPolicy(
                param_dtype=getattr(torch, param_dtype), reduce_dtype=torch.float32
            ),
        )
        row["sharded"] = True
        row["sharded_dtype"] = str(linear.weight._local_tensor.dtype).removeprefix("torch.")
        stage = "unshard (all-gather)"
        linear.unshard()
        row["unsharded_dtype"] = str(linear.weight.dtype).removeprefix("torch.")
        # Registered after fully_shard, so it runs after FSDP2 swapped the unsharded weight in.
        linear.register_forward_pre_hook(
            lambda m, a: seen.update(w=m.weight.detach().as_subclass(torch.Tensor).clone())
        )
        stage = "forward"
        y_post = linear(x).detach()
        delta = (y_post.float() - y_pre.float()).abs()
        row["max_abs_delta"] = float(delta.max())
        row["mean_abs_delta"] = float(delta.mean())
        row["output_bit_equal"] = bool(torch.equal(raw(y_pre), raw(y_post)))
        # FSDP2's param_dtype decides the output dtype: equal values in another dtype are kept.
        row["output_value_equal"] = row["output_bit_equal"] or bool(
            y_pre.shape == y_post.shape and torch.isfinite(delta).all() and not (delta != 0).any()
        )
    except Exception as exc:  # the stack's refusal is this pair's finding
        row["failure"] = {
            "stage": stage,
            "exception": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}",
        }
    if "w" in seen:
        row["forward_weight"] = compare(original, seen["w"])
    row["preserved"] = (
        row["failure"] is None
        and bool(row.get("forward_weight", {}).get("bytes_equal"))
        and bool(row.get("output_value_equal"))
    )
    return row


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
        "MASTER_PORT": "29547",
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
    mesh = init_device_mesh(device.type, (world_size,))

    rows = [
        run_pair(quant_storage, param_dtype, args, device, mesh)
        for quant_storage, param_dtype in COMBINATIONS
    ]
    result = {
        "rank": rank,
        "world_size": world_size,
        "torch": torch.__version__,
        "bitsandbytes": bnb.__version__,
        "rows": rows,
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


def describe(row):
    if row["failure"]:
        return f"{row['failure']['stage']} raised {row['failure']['exception']}"
    weight = row.get("forward_weight") or {}
    if not weight.get("bytes_equal"):
        how = (
            "cast by value"
            if weight.get("cast_by_value")
            else f"{weight.get('differing_bytes')} bytes differ"
        )
        return f"forward weight {weight.get('dtype')} ({how}), max |dy| {row.get('max_abs_delta')}"
    return f"max |dy| {row.get('max_abs_delta')}"


def verdict(ranks, device):
    """The run's exit status and its one line: 1 REPRODUCED, 0 NOT REPRODUCED. A pair breaks
    if it breaks on any rank."""
    first = ranks[0]
    head = f"ws={first['world_size']} {device} torch {first['torch']} bitsandbytes {first['bitsandbytes']}"
    broken = {}
    for each in ranks:
        for row in each["rows"]:
            if not row["matching"] and not row["preserved"]:
                broken.setdefault(row["combination"], row)
    mismatched = [row for row in first["rows"] if not row["matching"]]
    if broken:
        details = "; ".join(f"{name}: {describe(row)}" for name, row in broken.items())
        counts = f"{len(broken)} of {len(mismatched)} mismatched storage/param pairs break"
        return 1, f"REPRODUCED {head}: {counts}: {details}"
    return 0, f"NOT REPRODUCED {head}: all {len(mismatched)} mismatched pairs keep every byte and the output"


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown: a gloo worker thread can still be freeing the last
    # all-gather's Python-owned tensors then, and taking the GIL during finalization makes it
    # std::terminate (SIGABRT) after the results above were printed (seen on CPU under load).
    sys.stdout.flush()
    os._exit(status)
