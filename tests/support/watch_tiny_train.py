"""A plain one-process FSDP2 training loop (no torchrun) for tests/weightguard/test_watch.py.

Three blocks of a trainable Linear and a bitsandbytes Linear4bit (tests/support/guard_scenarios.py's
model), world size 1 on gloo, a few SGD steps; nothing in it knows about fsdpqdiag's guard.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from tests.support.guard_scenarios import build, train


def main() -> None:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    model, nan_weights = build()
    print("nan-weights", ",".join(nan_weights), flush=True)
    train(
        model, int(sys.argv[1]), torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
