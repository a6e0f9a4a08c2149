"""Standalone reproducer: does ``Linear4bit`` keep its QuantState under FSDP2?

Does bitsandbytes ``Linear4bit`` keep (or recover) its QuantState under FSDP2 ``fully_shard``,
and does the module still compute with the weight FSDP2 manages (torch + bitsandbytes only)?
Rank 0 prints one verdict line for the run (``--json`` adds each rank's measurements, one
JSON object a line); the exit status is 1 where it reproduces (quant_state lost, or
module.weight, its memory or its data no longer FSDP2's), 0 where not, 2 where forward
raised with nothing else wrong (no conclusion).

    torchrun --nproc-per-node 2 reproducers/quant_state_loss.py               # CPU/gloo or GPU/NCCL
    python reproducers/quant_state_loss.py --device cpu                       # world size 1

The weight is followed through forward, reshard, an in-place update of the shard (each
rank's rows reversed, as an optimizer step would write them) and a second forward.
``Linear4bit.forward`` calls ``fix_4bit_weight_quant_state_from_module``, which assigns a new
``Params4bit`` to ``module.weight``; the script checks that this tensor shares FSDP2's
unsharded storage, that reshard frees it, and that the second forward sees the update.

Mirrors fsdpqdiag's ``quant-state-loss`` probe (same seeds, same defaults); a test checks
both report the same evidence.
"""

import argparse
import gc
import json
import os
import socket
import sys
import weakref

import bitsandbytes as bnb
import torch
import torch.distributed as dist

try:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
except ImportError:
    from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.device_mesh import init_device_mesh


def raw(tensor):
    """The storage as a plain tensor: Params4bit and DTensor each intercept ops."""
    tensor = tensor.detach()
    tensor = getattr(tensor, "_local_tensor", tensor)
    return tensor.as_subclass(torch.Tensor) if type(tensor) is not torch.Tensor else tensor


def differing_elements(a, b):
    if a.dtype != b.dtype or a.numel() != b.numel():
        return max(a.numel(), b.numel())
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return int((a.contiguous().view(-1).view(bits) != b.contiguous().view(-1).view(bits)).sum())


def shares_storage(a, b):
    if a is None or b is None:
        return None
    first, second = raw(a).untyped_storage(), raw(b).untyped_storage()
    return first.nbytes() > 0 and first.data_ptr() == second.data_ptr()


def build(args, device):
    torch.manual_seed(args.weight_seed)
    return bnb.nn.Linear4bit(
        args.in_features,
        args.out_features,
        bias=False,
        quant_type="nf4",
        compute_dtype=torch.bfloat16,
        quant_storage=torch.bfloat16,
        compress_statistics=True,
    ).to(device)


def observed_forward(linear, x, fsdp_param):
    """Forward once; what FSDP2 handed in, and what forward computed with (post-recovery)."""
    # Left as None if forward fails before the weight reaches the layer.
    seen = {"handed": {"is_fsdp_unsharded_param": None, "type": None, "has_quant_state": None}}

    def before(module, args):
        weight = module.weight
        seen["handed"] = {
            "is_fsdp_unsharded_param": weight is fsdp_param._unsharded_param,
            "type": type(weight).__name__,
            "has_quant_state": getattr(weight, "quant_state", None) is not None,
        }
        seen["handed_bytes"] = raw(weight).clone()

    def after(module, args, output=None):
        if "used" in seen:
            return
        weight = module.weight
        quant_state = getattr(weight, "quant_state", None)
        seen["used_ref"], seen["used_quant_state"] = weakref.ref(weight), quant_state
        seen["used_bytes"] = raw(weight).clone()
        seen["used"] = {
            "type": type(weight).__name__,
            "has_quant_state": quant_state is not None,
            "quant_state_is_module_copy": quant_state is not None
            and quant_state is getattr(module, "quant_state", None),
            "is_fsdp_unsharded_param": weight is fsdp_param._unsharded_param,
            "uses_fsdp_storage": shares_storage(weight, fsdp_param._unsharded_param),
        }

    handles = [
        linear.register_forward_pre_hook(before),
        # prepend: before FSDP2's post-forward hook, which may reshard a non-root module
        linear.register_forward_hook(after, prepend=True),
    ]
    try:
        seen["output"], seen["error"] = linear(x).detach().clone(), None
    except Exception as exc:  # the failure under test: record it
        seen["output"], seen["error"] = None, f"{type(exc).__name__}: {exc}"
        after(linear, None)
    for handle in handles:
        handle.remove()
    return seen


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
    if "MASTER_PORT" not in os.environ:  # a lone process: any free port will do
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(probe.getsockname()[1])
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
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

    linear = build(args, device)
    x = torch.randn(2, args.in_features, generator=torch.Generator().manual_seed(args.input_seed))
    x = x.to(torch.bfloat16).to(device)
    original_quant_state = linear.weight.quant_state
    y_pre = linear(x).detach().clone()
    original = raw(linear.weight).clone()
    result = {
        "rank": rank,
        "world_size": world_size,
        "torch": torch.__version__,
        "bitsandbytes": bnb.__version__,
        "shape": list(original.shape),
        "elements": original.numel(),
        "module_keeps_quant_state": getattr(linear, "quant_state", None) is not None,
    }

    fully_shard(
        linear,
        mesh=init_device_mesh(device.type, (world_size,)),
        mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    )
    # FSDP2's record of the parameter (private API): sharded_param, _unsharded_param.
    fsdp_param = linear._get_fsdp_state()._fsdp_param_group.fsdp_params[0]
    sharded = linear.weight
    result["sharded"] = {
        "type": type(sharded).__name__,
        "local_type": type(sharded._local_tensor).__name__,
        "has_quant_state": getattr(sharded, "quant_state", None) is not None
        or getattr(sharded._local_tensor, "quant_state", None) is not None,
        "is_fsdp_sharded_param": sharded is fsdp_param.sharded_param,
    }

    first = observed_forward(linear, x, fsdp_param)
    used = first["used"]
    result["forward_weight"] = first["handed"]
    result["forward"] = {"status": "raised" if first["error"] else "completed", "error": first["error"]}
    result["recovery"] = {
        "needed": None if first["handed"]["type"] is None else not first["handed"]["has_quant_state"],
        "restored": used["has_quant_state"],
        "quant_state_is_module_copy": used["quant_state_is_module_copy"],
        "quant_state_is_original": first["used_quant_state"] is original_quant_state,
        "replaced_module_weight": not used["is_fsdp_unsharded_param"],
        "replacement_type": used["type"],
        "uses_fsdp_storage": used["uses_fsdp_storage"],
    }
    if first["error"] is None:
        delta = (first["output"].float() - y_pre.float()).abs()
        result["output_bit_equal"] = bool(
            torch.equal(first["output"].view(torch.int16), y_pre.view(torch.int16))
        )
        result["max_abs_delta"] = float(delta.max())
        result["after_forward"] = {
            "module_weight_is_fsdp_unsharded_param": used["is_fsdp_unsharded_param"],
            "fsdp_state": str(fsdp_param.sharded_state).rsplit(".", 1)[-1],
        }

        linear.reshard()
        gc.collect()
        retained = first["used_ref"]()  # alive only if something besides this script holds it
        unsharded_bytes = int(fsdp_param._unsharded_param.untyped_storage().nbytes())
        retained_bytes = int(raw(retained).untyped_storage().nbytes()) if retained is not None else 0
        result["after_reshard"] = {
            "module_weight_is_fsdp_sharded_param": linear.weight is fsdp_param.sharded_param,
            "fsdp_unsharded_storage_bytes": unsharded_bytes,
            "forward_weight_retained": retained is not None,
            "retained_storage_bytes": retained_bytes,
            "memory_freed": not unsharded_bytes and not retained_bytes,
        }
        del retained

        with torch.no_grad():  # an optimizer-like in-place write into this rank's shard
            shard_rows = raw(fsdp_param.sharded_param)
            shard_rows.copy_(shard_rows.flip(0))
        updated = torch.cat([rows.flip(0) for rows in torch.chunk(original, world_size, dim=0)])
        second = observed_forward(linear, x, fsdp_param)
        used_differs = differing_elements(second["handed_bytes"], second["used_bytes"])
        updated_elements = differing_elements(original, updated)
        reference = build(args, device)
        with torch.no_grad():
            raw(reference.weight).copy_(updated)
        y_reference = reference(x).detach()
        result["after_update"] = {
            "updated_elements": updated_elements,
            "handed_differs_from_update": differing_elements(updated, second["handed_bytes"]),
            "used_differs_from_handed": used_differs,
            "uses_fsdp_storage": second["used"]["uses_fsdp_storage"],
            "stale": used_differs > 0 if (used_differs or updated_elements) else None,
            "output_bit_equal_to_first_forward": bool(torch.equal(second["output"], first["output"])),
            "output_bit_equal_to_reference": bool(
                torch.equal(second["output"].view(torch.int16), y_reference.view(torch.int16))
            ),
            "max_abs_delta_to_reference": float((second["output"].float() - y_reference.float()).abs().max()),
        }
        linear.reshard()
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


def problems(result):
    """What one rank found wrong, as phrases."""
    found = []
    recovery, reshard = result["recovery"], result.get("after_reshard") or {}
    if recovery["needed"] and not recovery["restored"]:
        found.append("bitsandbytes' recovery did not restore quant_state")
    if reshard and not reshard["module_weight_is_fsdp_sharded_param"]:
        found.append("module.weight is not FSDP2's sharded parameter after reshard")
    if reshard and not reshard["memory_freed"]:
        kept = reshard["fsdp_unsharded_storage_bytes"] + reshard["retained_storage_bytes"]
        found.append(f"{kept} bytes of the unsharded weight stay allocated after reshard")
    if (result.get("after_update") or {}).get("stale"):
        found.append("after an update of the shard, forward computed with stale data")
    return found


def verdict(ranks, device):
    """The run's exit status and its one line: 1 REPRODUCED, 0 NOT REPRODUCED, 2 INCONCLUSIVE."""
    first = ranks[0]
    head = f"ws={first['world_size']} {device} torch {first['torch']} bitsandbytes {first['bitsandbytes']}"
    handed = first["forward_weight"]
    state = "with" if handed["has_quant_state"] else "without"
    seen = f"forward receives a {handed['type']} {state} quant_state"
    found = list(dict.fromkeys(p for r in ranks for p in problems(r)))
    errors = [r["forward"]["error"] for r in ranks if r["forward"]["error"]]
    if found:
        raised = f"; forward raised {errors[0]}" if errors else ""
        return 1, f"REPRODUCED {head}: {seen}; {'; '.join(found)}{raised}"
    if errors:
        return 2, f"INCONCLUSIVE {head}: {seen}, yet forward raised {errors[0]}"
    recovered = "bitsandbytes' recovery restored it" if first["recovery"]["needed"] else "no recovery needed"
    return 0, f"NOT REPRODUCED {head}: {seen}; {recovered}; reshard freed the storage; no stale data"


if __name__ == "__main__":
    status = main()
    # Skip interpreter teardown: a gloo worker thread can still be freeing the last
    # all-gather's Python-owned tensors then, and taking the GIL during finalization makes it
    # std::terminate (SIGABRT) after the results above were printed (seen on CPU under load).
    sys.stdout.flush()
    os._exit(status)
