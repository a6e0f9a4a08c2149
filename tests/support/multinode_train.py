"""A plain FSDP2 training loop for one torchrun agent of a two-node job (tests/weightguard/test_multinode.py).

tests/support/guard_scenarios.py's model (trainable Linears and bitsandbytes Linear4bit, fully_shard per
block), gloo over the job's environment; it prints each step so a test can kill a node mid-run.
With ``unsharded`` it forms the process group, runs one all-reduce and ends without importing
FSDP at all: a job the guard has nothing to check in. Nothing in it knows about fsdpqdiag's guard.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    dist.init_process_group("gloo")
    if sys.argv[1] == "unsharded":
        ones = torch.ones(1)
        dist.all_reduce(ones)
        print("all-reduce", ones.item(), flush=True)
        dist.destroy_process_group()
        return
    from tests.support.guard_scenarios import build, train  # imports FSDP and bitsandbytes

    steps, pause_s = int(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
    model, nan_weights = build()
    print("nan-weights", ",".join(nan_weights), flush=True)

    def report_step(step: int) -> None:
        print(f"step {step} rank {dist.get_rank()}", flush=True)
        time.sleep(pause_s)  # a long run that does not take the CPU from the other node

    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train(model, steps, optimizer, before_step=report_step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
