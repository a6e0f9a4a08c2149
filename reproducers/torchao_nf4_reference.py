"""Standalone: one NF4 weight through bitsandbytes and torchao on one FSDP2 stack.

torch, bitsandbytes and torchao only.

The same draw (``nn.Linear``'s initialization under the weight seed) is quantized by
bitsandbytes' ``Linear4bit`` (NF4, bf16 quant storage) and by torchao's ``to_nf4``; each is
sharded as its own unit by the same ``fully_shard`` and bf16 ``MixedPrecisionPolicy`` and
forwarded once, and a forward pre-hook copies the weight forward receives. Both libraries pack
two 4-bit codes a byte, the even element in the high nibble: bitsandbytes in bf16 containers,
torchao in a flat uint8 ``quantized_data``; both are split into one code per element and
compared before against at forward. Rank 0 prints one verdict line (``--json`` adds each rank's
measurements); exit status 1 where a library's codes reach forward altered, 0 where neither's
do, 2 where torchao's NF4Tensor cannot go through this stack (at world size 1, torch from 2.9:
https://github.com/pytorch/pytorch/pull/197999).

    torchrun --nproc-per-node 2 reproducers/torchao_nf4_reference.py     # CPU/gloo or GPU/NCCL

Mirrors fsdpqdiag's ``torchao-nf4-reference`` probe (same seeds, same defaults).
"""

import argparse
import json
import os
import sys

import bitsandbytes as bnb
import torch
import torch.distributed as dist
import torchao

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
try:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
except ImportError:
    from torchao.dtypes.nf4tensor import linear_nf4, to_nf4
from torch.distributed.device_mesh import init_device_mesh

INNER = ("quantized_data", "quantized_scalers", "quantization_factor")


def codes(packed):  # one 4-bit code per element, even elements (high nibbles) first
    data = packed.detach().contiguous().view(-1).view(torch.uint8)
    return torch.stack([data >> 4, data & 0x0F], dim=-1).view(-1)


def raw(tensor):
    return tensor.detach().as_subclass(torch.Tensor).contiguous().view(-1).view(torch.uint8).cpu()


class FrozenNF4Linear(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        return linear_nf4(x, self.weight)


def forward_copy(module, x, copy):
    seen = {}
    handle = module.register_forward_pre_hook(lambda m, a: seen.update(w=copy(m.weight)))
    try:
        module(x)
    finally:
        handle.remove()
    return seen["w"]


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
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29532"}.items():  # fmt: skip
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
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    x = torch.randn(2, args.in_features, generator=torch.Generator().manual_seed(args.input_seed))
    x = x.to(torch.bfloat16).to(device)

    torch.manual_seed(args.weight_seed)
    linear = bnb.nn.Linear4bit(
        args.in_features, args.out_features, bias=False, quant_type="nf4", compute_dtype=torch.bfloat16,
        quant_storage=torch.bfloat16, compress_statistics=True,
    ).to(device)  # fmt: skip
    bnb_before = raw(linear.weight)
    fully_shard(linear, mesh=mesh, mp_policy=policy)
    bnb_after = forward_copy(linear, x, raw)

    torch.manual_seed(args.weight_seed)
    drawn = torch.nn.Linear(args.in_features, args.out_features, bias=False).weight.detach()
    module = FrozenNF4Linear(to_nf4(drawn.to(device=device, dtype=torch.bfloat16)))
    ao_before = {name: raw(getattr(module.weight, name)) for name in INNER}
    fully_shard(module, mesh=mesh, mp_policy=policy)
    result = {"rank": rank, "world_size": world_size, "torch": torch.__version__,
              "bitsandbytes": bnb.__version__, "torchao": torchao.__version__}  # fmt: skip
    result["bitsandbytes_differing_codes"] = int((codes(bnb_before) != codes(bnb_after)).sum())
    try:
        ao_after = forward_copy(module, x, lambda w: {name: raw(getattr(w, name)) for name in INNER})
        result["torchao_differing_codes"] = int(
            (codes(ao_before["quantized_data"]) != codes(ao_after["quantized_data"])).sum()
        )
        result["torchao_inner_bytes_equal"] = all(torch.equal(ao_before[n], ao_after[n]) for n in INNER)
    except Exception as exc:  # the stack's refusal is the finding
        result["torchao_raised"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
    result["elements"] = args.in_features * args.out_features
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
    head = (
        f"ws={first['world_size']} {device} torch {first['torch']} bitsandbytes {first['bitsandbytes']} "
        f"torchao {first['torchao']}:"
    )
    bnb_codes = max(r["bitsandbytes_differing_codes"] for r in ranks)
    raised = next((r["torchao_raised"] for r in ranks if "torchao_raised" in r), None)
    bnb_said = f"bitsandbytes: {bnb_codes} of {first['elements']} codes differ at forward"
    if raised:
        return 2, f"INCONCLUSIVE {head} torchao's NF4Tensor raised in forward ({raised}); {bnb_said}"
    ao_codes = max(r["torchao_differing_codes"] for r in ranks)
    ao_altered = ao_codes or not all(r["torchao_inner_bytes_equal"] for r in ranks)
    detail = f"{head} {bnb_said}; torchao: {ao_codes} codes differ"
    if bnb_codes or ao_altered:
        follows = "the stack" if bnb_codes and ao_altered else ("the library" if bnb_codes else "torchao")
        return 1, f"REPRODUCED {detail}; the alteration follows {follows}"
    return 0, f"NOT REPRODUCED {detail}"


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown (a gloo worker thread may still free the last all-gather's tensors).
    sys.stdout.flush()
    os._exit(status)
