"""Scenarios of the weight guard in one torchrun launch (tests/weightguard/test_guard.py runs it at WS=1, 2).

Real ``fully_shard`` on gloo, real bitsandbytes ``Linear4bit`` layers, real optimizers; the
faults are fsdpqdiag's own reversible patches of FSDP2. Writes one JSON of what each scenario saw.
"""

from __future__ import annotations

import json
import sys

from fsdpqdiag.stack import bnb_import

# As the tool's own ranks import it: bitsandbytes' torch.compile wrappers compile at their first
# call rather than importing TorchInductor at import, seconds of CPU in each of the suite's
# processes that run this model. What runs is unchanged (fsdpqdiag.stack.bnb_import).
bnb_import.defer_compile_at_import()

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard  # noqa: E402
from torch.optim.optimizer import _global_optimizer_post_hooks  # noqa: E402

from fsdpqdiag.evidence.bytes import nan_census, plain  # noqa: E402
from fsdpqdiag.stack import faults  # noqa: E402
from fsdpqdiag.weightguard.guard import Guard, GuardTripped, guard  # noqa: E402

BLOCKS = 3
WIDTH = 256


def build():
    torch.manual_seed(7)
    model = nn.Sequential()
    for index in range(BLOCKS):
        block = nn.Sequential()
        block.add_module("adapter", nn.Linear(WIDTH, WIDTH))  # fp32, trainable, cast to bf16 by FSDP2
        quantized = bnb.nn.Linear4bit(
            WIDTH, WIDTH, bias=False, compute_dtype=torch.bfloat16, quant_storage=torch.bfloat16
        )
        block.add_module("frozen", quantized.to("cpu"))
        model.add_module(str(index), block)
    model.train()
    nan_weights = sorted(
        f"{name}"
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit) and nan_census(plain(module.weight))["nan_elements"]
    )
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model, nan_weights


def train(model, steps, optimizer, before_step=None):
    generator = torch.Generator().manual_seed(3)
    for step in range(steps):
        if before_step is not None:
            before_step(step)
        x = torch.randn(4, WIDTH, generator=generator).to(torch.bfloat16)
        model(x).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def hook_counts(model) -> dict:
    return {
        "module_pre_hooks": sum(len(m._forward_pre_hooks) for m in model.modules()),
        "optimizer_hooks": len(_global_optimizer_post_hooks),
    }


def summary(state: dict) -> dict:
    return {
        "findings": [
            {
                k: f.get(k)
                for k in (
                    "module",
                    "first_step",
                    "differing_elements",
                    "shard_byte_true",
                    "summary",
                    "post_bit_patterns",
                    "slices_differing",
                )
            }
            for f in state["findings"]
        ],
        "guarded": [g["parameter"] for g in state["guarded"]],
        "checks": sum(g["checks"] for g in state["guarded"]),
        "steps": state["steps"],
    }


def main() -> None:
    out_path, report_path = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    seen: dict = {"world_size": world_size}

    # silent: no fault, quantized weights only, then close() removes every hook
    model, nan_weights = build()
    seen["nan_weights"] = nan_weights
    before = hook_counts(model)
    handle = guard(model, params="quantized", action="raise")
    during = hook_counts(model)
    train(model, 2, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    seen["silent"] = summary(handle.close())
    seen["hooks"] = {"before": before, "during": during, "after": hook_counts(model)}

    # fault from step 1 on: trips on exactly the weights holding NaN-class containers
    model, _ = build()
    handle = guard(model, action="report", report_path=report_path)
    fault = faults.get("nan-canonicalize")
    undo = []

    def enable_at_step_1(step):
        if step == 1:
            undo.append(fault.apply(rank, world_size))

    train(
        model,
        3,
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        enable_at_step_1,
    )
    seen["fault"] = summary(handle.close())
    for u in undo:
        u()

    # every=2: only the forwards of even steps are verified; the fault from step 1 shows at step 2
    model, _ = build()
    handle = guard(model, action="report", every=2)
    undo = []
    sgd = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    train(model, 4, sgd, enable_at_step_1)
    seen["every2"] = summary(handle.close())
    for u in undo:
        u()

    # params="all": AdamW's updates are re-digested after each step and never trip it
    model, _ = build()
    trainable = [p for p in model.parameters() if p.requires_grad]
    handle = guard(model, params="all", action="raise")
    train(model, 3, torch.optim.AdamW(trainable, lr=0.1))
    seen["all"] = summary(handle.close())

    # params="all" positive control: a write into a trainable shard outside the optimizer trips it
    model, _ = build()
    trainable = [p for p in model.parameters() if p.requires_grad]
    handle = guard(model, params="all", action="report")

    def write_behind_the_optimizer(step):
        if step == 2:
            with torch.no_grad():
                model[1].adapter.weight._local_tensor.add_(1.0)

    train(model, 3, torch.optim.AdamW(trainable, lr=0.1), write_behind_the_optimizer)
    seen["all_written"] = summary(handle.close())

    # action="raise" stops the step that receives altered bytes
    model, _ = build()
    handle = Guard(model, action="raise")
    with fault.active(rank, world_size):
        try:
            train(model, 1, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
            seen["raised"] = None
        except GuardTripped as exc:
            seen["raised"] = str(exc)
    handle.close()

    # the transformers TrainerCallback, driven through the hooks a Trainer calls
    from fsdpqdiag.integrations.hf_trainer import GuardCallback

    # (the fault applied by the callback itself, made before the model is sharded: its report names it)
    model, _ = build()
    callback = GuardCallback(action="report", inject=fault.name)
    callback.on_train_begin(None, None, None, model=model)
    train(model, 2, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    callback.on_train_end(None, None, None, model=model)
    seen["callback"] = summary(callback.state)
    seen["callback_injected"] = callback.state["injected"]
    seen["callback_closed"] = callback.guard is None and hook_counts(model)["optimizer_hooks"] == 0
    seen["callback_closed"] = seen["callback_closed"] and callback.undo_fault is None

    # the callback with a workaround: made before the model is sharded, as a Trainer's callbacks
    # are, it applies fsdp2-bytes, and the same fault no longer reaches forward; undone at the end
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam

    unfixed_init_extensions = FSDPParam._init_extensions
    fixed = GuardCallback(action="report", fix="fsdp2-bytes")
    model, _ = build()
    fixed.on_train_begin(None, None, None, model=model)
    with fault.active(rank, world_size):
        train(model, 2, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    fixed.on_train_end(None, None, None, model=model)
    seen["callback_fixed"] = {**summary(fixed.state), "fix": fixed.state["fix"]}
    seen["fix_undone"] = FSDPParam._init_extensions is unfixed_init_extensions

    with open(out_path.replace("RANK", str(rank)), "w") as fh:
        json.dump(seen, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
