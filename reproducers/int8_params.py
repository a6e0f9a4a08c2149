"""Standalone reproducer: LoRA over ``Linear8bitLt(has_fp16_weights=False)`` under FSDP2.

A LoRA model over ``bnb.nn.Linear8bitLt(has_fp16_weights=False)`` under FSDP2
``fully_shard`` (torch + bitsandbytes + peft only). Stage by stage (fully_shard,
unshard, forward, backward, state_dict, save, load), are the int8 bytes and the ``SCB`` row
scales of ``Int8Params`` kept, and do outputs and LoRA gradients equal a non-FSDP baseline?
A stage that raises is recorded with the exception and the frame it came from. Rank 0
prints one verdict line for the run (``--json`` adds each rank's measurements, one JSON
object a line); the exit status is 1 where a stage fails on any rank, 0 where none does.

    torchrun --nproc-per-node 2 reproducers/int8_params.py               # CPU/gloo or GPU/NCCL
    python reproducers/int8_params.py --device cpu                       # world size 1

Mirrors fsdpqdiag's ``int8-params`` probe (same seeds, same defaults); a test checks both
report the same evidence.
"""

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import bitsandbytes as bnb
import peft
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import init_device_mesh

STAGES = ("fully_shard", "unshard", "forward", "backward", "state_dict", "save", "load")
PREFIX = "base_model.model.proj.base_layer."


class Int8LoRAModel(torch.nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def build(args, device, seed):
    """Linear8bitLt quantized on ``device`` (the CPU too) from a fixed-seed fp32 weight, plus LoRA."""
    torch.manual_seed(seed)
    proj = bnb.nn.Linear8bitLt(args.in_features, args.out_features, bias=False, has_fp16_weights=False)
    model = Int8LoRAModel(proj).to(device)
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["proj"], init_lora_weights=False
    )
    return get_peft_model(model, config)


def layer_of(model):
    return model.base_model.model.proj.base_layer


def as_bf16_lora(model):
    # FSDP2 computes the LoRA weights in the policy's bf16; so does the baseline.
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.to(torch.bfloat16)


def raised(exc):
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    path = frame.filename.replace("\\", "/")
    for marker in ("site-packages/", "dist-packages/"):
        path = path.split(marker, 1)[1] if marker in path else path
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return {
        "status": "raised",
        "error": f"{type(exc).__name__}: {first}",
        "where": f"{path}:{frame.lineno} in {frame.name}",
        "ok": False,
    }


def plain(tensor):
    tensor = tensor.detach()
    tensor = getattr(tensor, "_local_tensor", tensor)
    return tensor.as_subclass(torch.Tensor) if type(tensor) is not torch.Tensor else tensor


def full(tensor):
    return plain(tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).cpu()


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def describe(weight):
    local = getattr(weight, "_local_tensor", None)
    return {
        "type": type(weight).__name__,
        "local_type": type(local).__name__ if local is not None else None,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "scb_present": getattr(weight, "SCB", None) is not None or getattr(local, "SCB", None) is not None,
    }


def weight_stage(weight, expected):
    entry = describe(weight)
    observed = plain(weight).cpu()
    entry["bytes_equal"] = bool(same_bytes(observed, expected))
    entry["ok"] = entry["dtype"] == "int8" and entry["bytes_equal"] and entry["scb_present"]
    entry["status"] = "completed"
    return entry


def compare_output(reference, observed):
    delta = (observed.float() - reference.float()).abs()
    return {
        "output_bit_equal": bool(same_bytes(observed.detach(), reference)),
        "max_abs_delta": float(delta[torch.isfinite(delta)].max()) if torch.isfinite(delta).any() else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-features", type=int, default=1024)
    parser.add_argument("--out-features", type=int, default=1024)
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--weight-seed", type=int, default=42)
    parser.add_argument("--input-seed", type=int, default=123)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--backend", choices=["gloo", "nccl"], help="default: nccl on cuda, gloo on cpu")
    parser.add_argument("--json", action="store_true", help="also print each rank's measurements")
    args = parser.parse_args()
    for key, value in {
        "RANK": "0",
        "WORLD_SIZE": "1",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29533",
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
    x = torch.randn(args.batch, args.in_features, generator=torch.Generator().manual_seed(args.input_seed))
    x = x.to(dtype=torch.bfloat16, device=device)
    loss_of = lambda output: output.float().pow(2).mean()  # noqa: E731

    # Baseline, never sharded; its weight and SCB are read before forward moves SCB away.
    baseline = build(args, device, args.weight_seed)
    original = plain(layer_of(baseline).weight).cpu().clone()
    original_scb = layer_of(baseline).weight.SCB.detach().cpu().clone()
    baseline_keys = sorted(baseline.state_dict())
    as_bf16_lora(baseline)
    reference = baseline(x)
    loss_of(reference).backward()
    reference_grads = {n: p.grad.float().cpu() for n, p in baseline.named_parameters() if p.requires_grad}
    reference = reference.detach()

    model = build(args, device, args.weight_seed)
    layer = layer_of(model)
    stages = {}
    try:
        fully_shard(
            model,
            mesh=init_device_mesh(device.type, (world_size,)),
            mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
        )
    except Exception as exc:
        stages["fully_shard"] = raised(exc)
    else:
        # This rank's rows of the original, as Shard(0) splits them (torch.chunk semantics).
        chunks = torch.chunk(original, world_size, dim=0)
        mine = chunks[rank] if rank < len(chunks) else original[:0]
        stages["fully_shard"] = weight_stage(layer.weight, mine)

        try:
            model.unshard()
            stages["unshard"] = weight_stage(layer.weight, original)
            model.reshard()
        except Exception as exc:
            stages["unshard"] = raised(exc)

        seen = {}
        handle = layer.register_forward_pre_hook(lambda module, _: seen.update(describe(module.weight)))
        output = None
        try:
            output = model(x)
            entry = {"status": "completed", **compare_output(reference, output)}
        except Exception as exc:
            entry = raised(exc)
            model.reshard()
        handle.remove()
        entry["weight_seen"] = seen
        entry["ok"] = entry["status"] == "completed" and seen.get("scb_present") and entry["output_bit_equal"]
        stages["forward"] = entry

        if output is None:
            stages["backward"] = {"status": "not run", "ok": False}
        else:
            try:
                loss_of(output).backward()
                grads = {n: full(p.grad).float() for n, p in model.named_parameters() if p.grad is not None}
                bit_equal = {n: n in grads and torch.equal(grads[n], g) for n, g in reference_grads.items()}
                stages["backward"] = {"status": "completed", "grads_bit_equal": bit_equal}
                stages["backward"]["ok"] = all(bit_equal.values())
            except Exception as exc:
                stages["backward"] = raised(exc)

        state = None
        try:
            state = model.state_dict()
            entry = {
                "status": "completed",
                "keys": sorted(state),
                "missing_keys": sorted(set(baseline_keys) - set(state)),
                "weight_is_dtensor": type(state[PREFIX + "weight"]).__name__ == "DTensor",
                "scb_present": PREFIX + "SCB" in state,
                "weight_bytes_equal": bool(same_bytes(full(state[PREFIX + "weight"]), original)),
            }
            scb_ok = PREFIX + "SCB" not in state or torch.equal(full(state[PREFIX + "SCB"]), original_scb)
            entry["ok"] = not entry["missing_keys"] and len(state) == len(baseline_keys)
            entry["ok"] = entry["ok"] and entry["weight_bytes_equal"] and bool(scb_ok)
            stages["state_dict"] = entry
        except Exception as exc:
            stages["state_dict"] = raised(exc)

        saved = None
        if state is not None:
            try:
                # Gathered to full tensors and torch.save'd, as save_pretrained does.
                full_state = {key: full(value) for key, value in state.items()}
                with tempfile.TemporaryDirectory() as directory:
                    torch.save(full_state, Path(directory) / "pytorch_model.bin")
                    saved = torch.load(Path(directory) / "pytorch_model.bin", weights_only=True)
                round_trip = sorted(saved) == sorted(full_state) and all(
                    same_bytes(saved[key], full_state[key]) for key in full_state
                )
                stages["save"] = {"status": "completed", "round_trip_equal": round_trip}
                stages["save"]["scb_saved"] = PREFIX + "SCB" in saved
                stages["save"]["ok"] = round_trip and stages["save"]["scb_saved"]
            except Exception as exc:
                stages["save"] = raised(exc)

        if saved is not None:
            # A fresh layer quantized from other seeds: only a complete checkpoint makes it
            # equal to the baseline.
            fresh = build(args, device, args.weight_seed + 1)
            try:
                loaded = fresh.load_state_dict(saved, strict=False)
                as_bf16_lora(fresh)
                weight = plain(layer_of(fresh).weight).cpu()
                scb = layer_of(fresh).weight.SCB.detach().cpu()
                entry = {
                    "status": "completed",
                    "missing_keys": sorted(loaded.missing_keys),
                    "unexpected_keys": sorted(loaded.unexpected_keys),
                    "weight_bytes_equal": bool(same_bytes(weight, original)),
                    "scb_equal": bool(torch.equal(scb, original_scb)),
                    **compare_output(reference, fresh(x).detach()),
                }
                entry["ok"] = not entry["missing_keys"] and not entry["unexpected_keys"]
                entry["ok"] = entry["ok"] and entry["weight_bytes_equal"] and entry["scb_equal"]
                entry["ok"] = entry["ok"] and entry["output_bit_equal"]
                stages["load"] = entry
            except Exception as exc:
                stages["load"] = raised(exc)

    result = {
        "rank": rank,
        "world_size": world_size,
        "torch": torch.__version__,
        "bitsandbytes": bnb.__version__,
        "peft": peft.__version__,
        "stages": stages,
        "first_failing_stage": next((s for s in STAGES if not stages.get(s, {"ok": False})["ok"]), None),
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


def verdict(ranks, device):
    """The run's exit status and its one line: 1 REPRODUCED (a stage fails on some rank),
    0 NOT REPRODUCED."""
    first = ranks[0]
    head = (
        f"ws={first['world_size']} {device} torch {first['torch']} bitsandbytes {first['bitsandbytes']} "
        f"peft {first['peft']}"
    )
    failing = {}
    for name in STAGES:
        for each in ranks:
            entry = each["stages"].get(name)
            if entry is not None and not entry["ok"]:
                failing[name] = (each["rank"], entry)
                break
    if not failing:
        kept = "every stage kept the int8 bytes and SCB; outputs and gradients bit-equal"
        return 0, f"NOT REPRODUCED {head}: {kept}"
    (name, (rank, entry)), *later = failing.items()
    lost = ", ".join(k for k, v in entry.items() if v is False and k != "ok")
    why = entry.get("error") or (f"false: {lost}" if lost else "not ok")
    then = f"; then failing: {', '.join(n for n, _ in later)}" if later else ""
    return 1, f"REPRODUCED {head}: first failing stage {name} (rank {rank}): {why}{then}"


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown: a gloo worker thread can still be freeing the last
    # all-gather's Python-owned tensors then, and taking the GIL during finalization makes it
    # std::terminate (SIGABRT) after the results above were printed (seen on CPU under load).
    sys.stdout.flush()
    os._exit(status)
