"""Standalone reproducer: bitsandbytes' in-place CPU weight repack under FSDP2 (torch + bitsandbytes only).

On a CPU with AVX512-BF16, ``Linear4bit.forward`` in inference rewrites ``self.weight.data``
into a CPU-blocked layout and marks the module's ``QuantState`` ``packing_format_for_cpu``.
Under ``fully_shard`` that weight is FSDP2's unsharded parameter, re-made from the shards at
every unshard. Forward twice with a reshard between: does forward receive the original bytes
each time, and does each output match the same layer without FSDP2? Rank 0 prints one
verdict line for the run (``--json`` adds each rank's measurements, one JSON object a line);
the exit status is 1 where the bug reproduces, 0 where it does not, 2 where the layer without
FSDP2 is unstable itself (no conclusion).

    torchrun --nproc-per-node 2 reproducers/cpu_weight_repack.py
    python reproducers/cpu_weight_repack.py                       # world size 1
    python reproducers/cpu_weight_repack.py --repack on           # the repack path on any CPU

Mirrors fsdpqdiag's ``cpu-weight-repack`` probe (same seeds, same defaults); a test checks
both report the same evidence.
"""

import argparse
import copy
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


def bits(tensor):
    return tensor.detach().as_subclass(torch.Tensor).contiguous().view(-1).view(torch.uint8)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--out-features", type=int, default=1024)
    parser.add_argument("--device", choices=["cpu"], default="cpu")
    parser.add_argument("--repack", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--weight-seed", type=int, default=42)
    parser.add_argument("--input-seed", type=int, default=123)
    parser.add_argument("--backend", choices=["gloo"], default="gloo")
    parser.add_argument("--json", action="store_true", help="also print each rank's measurements")
    args = parser.parse_args()
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29533",
    }.items():
        os.environ.setdefault(key, value)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(args.backend)

    torch.manual_seed(args.weight_seed)
    linear = bnb.nn.Linear4bit(
        args.in_features,
        args.out_features,
        bias=False,
        quant_type="nf4",
        compute_dtype=torch.bfloat16,
        quant_storage=torch.bfloat16,
        compress_statistics=True,
    )
    if args.repack != "auto":  # bitsandbytes reads has_avx512bf16() into this at construction
        linear.support_avx512bf16_for_cpu = args.repack == "on"
    linear = linear.to("cpu").eval()
    x = torch.randn(2, args.in_features, generator=torch.Generator().manual_seed(args.input_seed))
    x = x.to(torch.bfloat16)
    original = bits(linear.weight).clone()  # before any forward: the first one rewrites it
    reference_layer = copy.deepcopy(linear)
    with torch.no_grad():
        reference = reference_layer(x)
        control_stable = torch.equal(reference, reference_layer(x))

    fully_shard(
        linear,
        mesh=init_device_mesh("cpu", (world_size,)),
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    )
    seen = {}
    linear.register_forward_pre_hook(lambda m, a: seen.update(w=bits(m.weight).clone()))
    forwards = []
    for _ in range(2):
        with torch.no_grad():
            out = linear(x)
        state = linear.weight.quant_state if hasattr(linear.weight, "quant_state") else linear.quant_state
        linear.reshard()
        shard = torch.chunk(original.view(torch.bfloat16).view(-1, 1), world_size, dim=0)[rank]
        forwards.append(
            {
                "received_bytes_equal": bool(torch.equal(seen["w"], original)),
                "repacked_after_forward": bool(getattr(state, "packing_format_for_cpu", False)),
                "max_abs_delta": float((out.float() - reference.float()).abs().max()),
                "output_bit_equal": bool(torch.equal(out, reference)),
                "local_tensor_bytes_equal": bool(torch.equal(bits(linear.weight._local_tensor), bits(shard))),
            }
        )
    result = {
        "rank": rank,
        "world_size": world_size,
        "torch": torch.__version__,
        "bitsandbytes": bnb.__version__,
        "repack_path": bool(linear.support_avx512bf16_for_cpu),
        "control_without_fsdp_stable": bool(control_stable),
        "forwards": forwards,
    }
    ranks = [None] * world_size
    dist.all_gather_object(ranks, result)  # rank 0 speaks for the run, in one line
    dist.destroy_process_group()
    status, line = verdict(ranks)
    if rank == 0:
        if args.json:
            for each in ranks:
                print(json.dumps(each), flush=True)
        print(line, flush=True)
    return status


def verdict(ranks):
    """The run's exit status and its one line: 1 REPRODUCED, 0 NOT REPRODUCED, 2 INCONCLUSIVE."""
    forwards = [f for r in ranks for f in r["forwards"]]
    first = ranks[0]
    path = "repack path" if first["repack_path"] else "dequantize path"
    deltas = ", ".join(
        f"forward {i + 1}: max |dy| = {f['max_abs_delta']}" for i, f in enumerate(first["forwards"])
    )
    intact = all(f["received_bytes_equal"] and f["local_tensor_bytes_equal"] for f in forwards)
    received = "every original byte" if intact else "altered bytes"
    head = f"ws={first['world_size']} torch {first['torch']} bitsandbytes {first['bitsandbytes']}, {path}"
    detail = f"{head}: forward received {received}; {deltas}"
    if intact and all(f["output_bit_equal"] for f in forwards):
        return 0, f"NOT REPRODUCED {detail}; outputs bit-equal to the layer without FSDP2"
    if not all(r["control_without_fsdp_stable"] for r in ranks):
        return 2, f"INCONCLUSIVE {detail}; the layer without FSDP2 is unstable too"
    flag = (
        "; QuantState stays marked packing_format_for_cpu while FSDP2 hands forward the original layout"
        if first["forwards"][-1]["repacked_after_forward"] and intact
        else ""
    )
    return 1, f"REPRODUCED {detail}; output differs from the layer without FSDP2{flag}"


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown: a gloo worker thread can still be freeing the last
    # all-gather's Python-owned tensors then (see reproducers/nan_canonicalization.py).
    sys.stdout.flush()
    os._exit(status)
