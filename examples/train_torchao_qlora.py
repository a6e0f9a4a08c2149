"""A minimal torchtune-style QLoRA loop on torchao's NF4Tensor: what `fsdpqdiag watch` wraps.

    torchrun --nproc-per-node 2 examples/train_torchao_qlora.py --steps 3                 # CPU (gloo)
    torchrun --nproc-per-node 2 examples/train_torchao_qlora.py --device cuda --backend gloo  # 1 GPU
    fsdpqdiag watch --json w.json -- torchrun --nproc-per-node 2 examples/train_torchao_qlora.py

Blocks of a frozen NF4 weight (torchao's ``to_nf4``, used through ``linear_nf4`` as torchtune's
``FrozenNF4Linear`` does) plus a bf16 low-rank adapter; ``fully_shard`` per block then the
root with a bf16 MixedPrecisionPolicy, AdamW on the adapters, a few steps on a fixed batch.
Fixed-seed weights, no download. Needs torchao (``pip install -e ".[torchao]"``) and a world
size of at least 2: at world size 1, torch's FSDP2 skips the all-gather and hands an NF4Tensor's
``fsdp_post_all_gather`` one tensor of three (https://github.com/pytorch/pytorch/pull/197999).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

try:  # torchao >= 0.15 keeps NF4Tensor among its quantization workflows
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4, to_nf4
except ImportError:  # older torchao: torchao.dtypes.nf4tensor
    from torchao.dtypes.nf4tensor import linear_nf4, to_nf4


class QLoRABlock(torch.nn.Module):
    """A frozen NF4 projection plus a trainable low-rank adapter, as torchtune's LoRALinear."""

    def __init__(self, width: int, rank: int):
        super().__init__()
        frozen = torch.randn(width, width, dtype=torch.bfloat16) / width**0.5
        self.weight = torch.nn.Parameter(to_nf4(frozen), requires_grad=False)
        self.lora_a = torch.nn.Linear(width, rank, bias=False, dtype=torch.bfloat16)
        self.lora_b = torch.nn.Linear(rank, width, bias=False, dtype=torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_nf4(x, self.weight) + self.lora_b(self.lora_a(x))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backend", choices=("nccl", "gloo"), help="cuda: nccl (default) or gloo; cpu: gloo")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--blocks", type=int, default=2)
    # NF4Tensor needs a multiple of 64 * 256 elements per shard (its scaler blocks).
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if args.device == "cuda":
        # More ranks than GPUs share them (gloo only: NCCL refuses two ranks on one GPU).
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        if (args.backend or "nccl") == "nccl":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank = dist.get_rank()

    torch.manual_seed(0)  # the same weights on every rank, as a checkpoint would give
    model = torch.nn.Sequential(*(QLoRABlock(args.width, 8) for _ in range(args.blocks))).to(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    generator = torch.Generator().manual_seed(1234 + rank)
    for step in range(args.steps):
        x = torch.randn(args.batch, args.width, generator=generator).to(device, torch.bfloat16)
        loss = model(x).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if rank == 0:
            print(f"step {step} loss {loss.item():.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
