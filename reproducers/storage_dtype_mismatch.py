"""Standalone reproducer: ``Linear4bit`` whose ``quant_storage`` differs from FSDP2's
``MixedPrecisionPolicy.param_dtype`` (torch + bitsandbytes only).

For each (quant_storage, param_dtype) pair, on a fresh layer: does ``fully_shard``
succeed, does unshard (the all-gather) and forward run, which dtype does forward see, are
the packed bytes and the output (vs the same layer without FSDP) preserved? A failure is
recorded with its stage and the next pair still runs. Prints one JSON line per rank.

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
    except Exception as exc:  # the stack's refusal is this pair's finding
        row["failure"] = {
            "stage": stage,
            "exception": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}",
        }
    if "w" in seen:
        row["forward_weight"] = compare(original, seen["w"])
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
        torch.device("cuda", int(os.environ["LOCAL_RANK"])) if args.device == "cuda" else torch.device("cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
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
    print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: a gloo worker thread can still be freeing the last
    # all-gather's Python-owned tensors then, and taking the GIL during finalization makes it
    # std::terminate (SIGABRT) after the results above were printed (seen on CPU under load).
    sys.stdout.flush()
    os._exit(0)
